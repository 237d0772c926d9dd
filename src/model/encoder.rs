//! The BERT-family encoder (bert, roberta): learned absolute positions and token types,
//! post-LayerNorm blocks, bidirectional attention within each sequence, GELU MLP. Follows
//! transformers' `modeling_bert.py`; only the embeddings and blocks run (no pooler, no head).

use super::checkpoint::Checkpoint;
use super::config::EncoderConfig;
use super::{Batch, Capture, Linear, Module, Need, Point};
use crate::device::backend::{AttentionMask, Backend, Heads};
use crate::{Error, Result};
use std::ops::Range;

struct Block<W> {
    query: Linear<W>,
    key: Linear<W>,
    value: Linear<W>,
    attn_out: Linear<W>,
    attn_norm: (W, W),
    intermediate: Linear<W>,
    output: Linear<W>,
    out_norm: (W, W),
}

/// The embedding layer: words, positions, optional token types, LayerNorm.
struct Embeddings<W> {
    words: W,
    positions: W,
    types: Option<W>,
    norm: (W, W),
}

/// A loaded slice of an encoder: blocks `first..first + blocks.len()`, and the embeddings when
/// the slice starts at block 0.
pub struct Encoder<B: Backend> {
    cfg: EncoderConfig,
    embeddings: Option<Embeddings<B::Weight>>,
    first: usize,
    blocks: Vec<Block<B::Weight>>,
}

/// The block's linear layers in model order: (suffix, point, in, out).
fn linears(c: &EncoderConfig) -> [(&'static str, Point, usize, usize); 6] {
    let h = c.hidden;
    [
        ("attention.self.query", Point::AttnIn, h, h),
        ("attention.self.key", Point::AttnIn, h, h),
        ("attention.self.value", Point::AttnIn, h, h),
        ("attention.output.dense", Point::AttnOut, h, h),
        ("intermediate.dense", Point::MlpIn, h, c.intermediate),
        ("output.dense", Point::MlpHidden, c.intermediate, h),
    ]
}

/// Every linear layer inside the blocks, in model order, from the configuration (their
/// tensors are checked against the checkpoint when a slice holding them is loaded).
pub fn modules(c: &EncoderConfig, prefix: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for layer in 0..c.layers {
        for (suffix, point, i, o) in linears(c) {
            out.push(Module {
                name: format!("{prefix}encoder.layer.{layer}.{suffix}"),
                layer,
                point,
                in_features: i,
                out_features: o,
                expert: None,
            });
        }
    }
    out
}

/// Parameters of one block: linear layers with biases and two LayerNorms.
pub fn block_parameters(c: &EncoderConfig) -> u64 {
    let linear: u64 = linears(c)
        .iter()
        .map(|&(_, _, i, o)| (i * o + o) as u64)
        .sum();
    linear + 4 * c.hidden as u64
}

/// Parameters of the embeddings: word, position and token-type tables and a LayerNorm.
pub fn embedding_parameters(c: &EncoderConfig, vocab: usize) -> u64 {
    ((vocab + c.max_positions + c.type_vocab + 2) * c.hidden) as u64
}

/// LayerNorm weight and bias; old BERT checkpoints name them `gamma` / `beta` (transformers
/// renames those when loading).
fn norm<B: Backend>(
    be: &B,
    ckpt: &Checkpoint,
    base: &str,
    n: usize,
) -> Result<(B::Weight, B::Weight)> {
    let pick = |new: &str, old: &str| -> Result<B::Weight> {
        let name = if !ckpt.has(&format!("{base}.{new}")) && ckpt.has(&format!("{base}.{old}")) {
            format!("{base}.{old}")
        } else {
            format!("{base}.{new}")
        };
        be.weight(ckpt.expect(&name, &[Some(n)])?)
    };
    Ok((pick("weight", "gamma")?, pick("bias", "beta")?))
}

impl<B: Backend> Encoder<B> {
    /// Loads blocks `blocks`, and the embeddings if they start at block 0.
    pub fn load(
        be: &B,
        c: &EncoderConfig,
        vocab: usize,
        ckpt: &Checkpoint,
        prefix: &str,
        blocks: Range<usize>,
    ) -> Result<Self> {
        let w = |name: String, shape: &[Option<usize>]| -> Result<B::Weight> {
            be.weight(ckpt.expect(&name, shape)?)
        };
        let h = c.hidden;
        let embeddings = if blocks.start == 0 {
            let e = format!("{prefix}embeddings.");
            let types_name = format!("{e}token_type_embeddings.weight");
            Some(Embeddings {
                words: w(
                    format!("{e}word_embeddings.weight"),
                    &[Some(vocab), Some(h)],
                )?,
                positions: w(
                    format!("{e}position_embeddings.weight"),
                    &[Some(c.max_positions), Some(h)],
                )?,
                types: if ckpt.has(&types_name) {
                    Some(w(types_name, &[Some(c.type_vocab), Some(h)])?)
                } else {
                    None
                },
                norm: norm(be, ckpt, &format!("{e}LayerNorm"), h)?,
            })
        } else {
            None
        };
        let first = blocks.start;
        let mut loaded = Vec::with_capacity(blocks.len());
        for layer in blocks {
            let base = format!("{prefix}encoder.layer.{layer}.");
            let lin = |suffix: &str| -> Result<Linear<B::Weight>> {
                let (_, _, i, o) = linears(c)
                    .into_iter()
                    .find(|l| l.0 == suffix)
                    .expect("known suffix");
                Ok(Linear {
                    w: w(format!("{base}{suffix}.weight"), &[Some(o), Some(i)])?,
                    b: Some(w(format!("{base}{suffix}.bias"), &[Some(o)])?),
                })
            };
            loaded.push(Block {
                query: lin("attention.self.query")?,
                key: lin("attention.self.key")?,
                value: lin("attention.self.value")?,
                attn_out: lin("attention.output.dense")?,
                attn_norm: norm(be, ckpt, &format!("{base}attention.output.LayerNorm"), h)?,
                intermediate: lin("intermediate.dense")?,
                output: lin("output.dense")?,
                out_norm: norm(be, ckpt, &format!("{base}output.LayerNorm"), h)?,
            });
        }
        Ok(Encoder {
            cfg: c.clone(),
            embeddings,
            first,
            blocks: loaded,
        })
    }

    /// The embedding layer's output for `batch`.
    fn embed(&self, be: &B, batch: &Batch) -> Result<B::Tensor> {
        let c = &self.cfg;
        let emb = self.embeddings.as_ref().ok_or_else(|| {
            Error::Comm(format!(
                "encoder slice from block {} has no embeddings and was given no hidden state",
                self.first
            ))
        })?;
        let mut e = be.zeros(batch.ids.len(), c.hidden);
        be.embed(&mut e, &emb.words, &batch.ids, "word_embeddings")?;
        match &emb.types {
            Some(t) => be.embed(&mut e, t, &batch.type_ids, "token_type_embeddings")?,
            None if batch.type_ids.iter().any(|&t| t != 0) => {
                return Err(Error::data("the tokenizer produced token type ids but the checkpoint has no token_type_embeddings"))
            }
            None => {}
        }
        be.embed(
            &mut e,
            &emb.positions,
            &batch.positions,
            "position_embeddings",
        )?;
        Ok(be.layer_norm(&e, &emb.norm.0, &emb.norm.1, c.eps))
    }

    /// Runs the slice's blocks over `batch` from `input` (or from the embeddings on the first
    /// stage), handing each needed capture point to `capture`. With `output` every block runs
    /// and the hidden state is returned; without, the pass stops after the last needed point.
    pub fn forward(
        &self,
        be: &B,
        batch: &Batch,
        need: &Need,
        input: Option<B::Tensor>,
        output: bool,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<Option<B::Tensor>> {
        let c = &self.cfg;
        let Some(last) = need.stop(output) else {
            return Ok(None);
        };
        let stop = |at: (usize, Point)| last == Some(at);
        let mut h = match input {
            Some(h) => h,
            None => self.embed(be, batch)?,
        };
        let heads = Heads::new(c.heads, c.heads, c.hidden / c.heads);
        for (i, b) in self.blocks.iter().enumerate() {
            let layer = self.first + i;
            if last.is_some_and(|l| layer > l.0) {
                break;
            }
            if need.get(layer, Point::AttnIn) {
                capture(layer, Point::AttnIn, &h, None)?;
            }
            if stop((layer, Point::AttnIn)) {
                return Ok(None);
            }
            let q = b.query.apply(be, &h);
            let k = b.key.apply(be, &h);
            let v = b.value.apply(be, &h);
            let ctx = be.attention(
                &q,
                &k,
                &v,
                heads,
                &batch.segments,
                AttentionMask::Bidirectional,
            );
            drop((q, k, v));
            if need.get(layer, Point::AttnOut) {
                capture(layer, Point::AttnOut, &ctx, None)?;
            }
            if stop((layer, Point::AttnOut)) {
                return Ok(None);
            }
            let a = be.add_layer_norm(
                b.attn_out.apply(be, &ctx),
                &h,
                &b.attn_norm.0,
                &b.attn_norm.1,
                c.eps,
            );
            if need.get(layer, Point::MlpIn) {
                capture(layer, Point::MlpIn, &a, None)?;
            }
            if stop((layer, Point::MlpIn)) {
                return Ok(None);
            }
            let mut i = b.intermediate.apply(be, &a);
            be.activate(&mut i, c.act);
            if need.get(layer, Point::MlpHidden) {
                capture(layer, Point::MlpHidden, &i, None)?;
            }
            if stop((layer, Point::MlpHidden)) {
                return Ok(None);
            }
            h = be.add_layer_norm(
                b.output.apply(be, &i),
                &a,
                &b.out_norm.0,
                &b.out_norm.1,
                c.eps,
            );
        }
        Ok(output.then_some(h))
    }
}
