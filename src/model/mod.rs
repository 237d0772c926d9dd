//! HuggingFace checkpoints on the CPU: the configuration, the weights, the tokenizer and the
//! forward passes that produce the inputs of every linear layer inside the transformer blocks.
//!
//! | module | role |
//! |---|---|
//! | [`config`] | `config.json` → architecture and sizes; supported `model_type`s |
//! | [`checkpoint`] | memory-mapped safetensors (single file or shards), F32/F16/BF16 |
//! | [`ops`] | the [`ops::Backend`] trait the forward passes are written against; [`ops::Cpu`] |
//! | [`decoder`] | llama, mistral, qwen2 |
//! | [`encoder`] | bert, roberta |
//! | [`text`] | `.txt` / `.jsonl` examples and tokenization with the model's `tokenizer.json` |
//!
//! [`Model`] ties them together: [`Model::open`] reads the config and indexes the checkpoint,
//! [`Model::modules`] lists the linear layers (named by their checkpoint key paths, which are
//! the module paths PEFT sees) with the capture point that feeds each, and [`Model::forward`]
//! runs a packed batch and hands the activations at each needed capture point to a callback.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod ops;
pub mod text;

use crate::{Error, Result};
use checkpoint::Checkpoint;
use config::{Family, ModelConfig};
use ops::{Backend, Segments};
use std::path::Path;

/// Where in a block a linear layer reads its input; layers at the same point of the same block
/// read the same tensor (an equal-input group).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// The normalized hidden state entering attention (q/k/v; BERT query/key/value).
    AttnIn = 0,
    /// The attention output entering the output projection (o_proj; attention.output.dense).
    AttnOut = 1,
    /// The normalized hidden state entering the MLP (gate/up; intermediate.dense).
    MlpIn = 2,
    /// The MLP's hidden activation entering the down projection (down_proj; output.dense).
    MlpHidden = 3,
}

impl Point {
    /// All points, in forward order.
    pub const ALL: [Point; 4] = [
        Point::AttnIn,
        Point::AttnOut,
        Point::MlpIn,
        Point::MlpHidden,
    ];
}

/// One linear layer inside a transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Checkpoint key without `.weight`, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// Block index.
    pub layer: usize,
    /// Which tensor feeds it.
    pub point: Point,
    pub in_features: usize,
    pub out_features: usize,
}

/// Which capture points a forward pass must deliver.
#[derive(Clone, Debug, Default)]
pub struct Need {
    flags: Vec<[bool; 4]>,
}

impl Need {
    /// Nothing needed, for `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Need {
            flags: vec![[false; 4]; layers],
        }
    }

    /// Marks a point as needed.
    pub fn set(&mut self, layer: usize, point: Point) {
        self.flags[layer][point as usize] = true;
    }

    /// Whether a point is needed.
    pub fn get(&self, layer: usize, point: Point) -> bool {
        self.flags.get(layer).is_some_and(|f| f[point as usize])
    }

    /// The last needed point in forward order, if any.
    pub fn last(&self) -> Option<(usize, Point)> {
        self.flags.iter().enumerate().rev().find_map(|(l, f)| {
            Point::ALL
                .iter()
                .rev()
                .find(|p| f[**p as usize])
                .map(|&p| (l, p))
        })
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

/// Receives the activation `[tokens, in_features]` at a capture point of a block.
pub type Capture<'a, T> = dyn FnMut(usize, Point, &T) -> Result<()> + 'a;

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
    /// Key prefix in front of the base model's tensors (`model.`, `bert.`, `roberta.` or ``).
    pub prefix: String,
    modules: Vec<Module>,
}

/// A model whose weights are resident on a backend, ready to run.
pub enum Loaded<B: Backend> {
    Decoder(decoder::Decoder<B>),
    Encoder(encoder::Encoder<B>),
}

impl Model {
    /// Reads `config.json`, maps the checkpoint and finds the key prefix.
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
        let modules = match &config.family {
            Family::Decoder(c) => decoder::modules(c, &checkpoint, &prefix)?,
            Family::Encoder(c) => encoder::modules(c, &checkpoint, &prefix)?,
        };
        Ok(Model {
            config,
            checkpoint,
            prefix,
            modules,
        })
    }

    /// Every linear layer inside the transformer blocks, in model order.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// Number of transformer blocks.
    pub fn layers(&self) -> usize {
        match &self.config.family {
            Family::Decoder(c) => c.layers,
            Family::Encoder(c) => c.layers,
        }
    }

    /// Decodes the weights of the first `layers` blocks (and the embeddings) onto `be`.
    pub fn load<B: Backend>(&self, be: &B, layers: usize) -> Result<Loaded<B>> {
        let layers = layers.min(self.layers());
        Ok(match &self.config.family {
            Family::Decoder(c) => Loaded::Decoder(decoder::Decoder::load(
                be,
                c,
                self.config.vocab,
                &self.checkpoint,
                &self.prefix,
                layers,
            )?),
            Family::Encoder(c) => Loaded::Encoder(encoder::Encoder::load(
                be,
                c,
                self.config.vocab,
                &self.checkpoint,
                &self.prefix,
                layers,
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

impl<B: Backend> Loaded<B> {
    /// Runs the forward pass, delivering the needed capture points.
    pub fn forward(
        &self,
        be: &B,
        batch: &Batch,
        need: &Need,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<()> {
        match self {
            Loaded::Decoder(m) => m.forward(be, batch, need, capture),
            Loaded::Encoder(m) => m.forward(be, batch, need, capture),
        }
    }
}
