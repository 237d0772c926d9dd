//! The BERT-family encoder (bert, roberta): learned absolute positions and token types,
//! post-LayerNorm blocks, bidirectional attention within each sequence, GELU MLP. Follows
//! transformers' `modeling_bert.py`; only the embeddings and blocks run (no pooler, no head).

use super::checkpoint::Checkpoint;
use super::config::EncoderConfig;
use super::ops::{AttentionMask, Backend, Heads};
use super::{Batch, Capture, Linear, Module, Need, Point};
use crate::{Error, Result};

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

/// A loaded encoder.
pub struct Encoder<B: Backend> {
    cfg: EncoderConfig,
    words: B::Weight,
    positions: B::Weight,
    types: Option<B::Weight>,
    norm: (B::Weight, B::Weight),
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

/// Every linear layer inside the blocks, in model order, checked against the checkpoint.
pub fn modules(c: &EncoderConfig, ckpt: &Checkpoint, prefix: &str) -> Result<Vec<Module>> {
    let mut out = Vec::new();
    for layer in 0..c.layers {
        for (suffix, point, i, o) in linears(c) {
            let name = format!("{prefix}encoder.layer.{layer}.{suffix}");
            ckpt.expect(&format!("{name}.weight"), &[Some(o), Some(i)])?;
            out.push(Module {
                name,
                layer,
                point,
                in_features: i,
                out_features: o,
            });
        }
    }
    Ok(out)
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
        let name = if ckpt.get(&format!("{base}.{new}")).is_none()
            && ckpt.get(&format!("{base}.{old}")).is_some()
        {
            format!("{base}.{old}")
        } else {
            format!("{base}.{new}")
        };
        be.weight(ckpt.expect(&name, &[Some(n)])?)
    };
    Ok((pick("weight", "gamma")?, pick("bias", "beta")?))
}

impl<B: Backend> Encoder<B> {
    /// Loads the embeddings and the first `layers` blocks.
    pub fn load(
        be: &B,
        c: &EncoderConfig,
        vocab: usize,
        ckpt: &Checkpoint,
        prefix: &str,
        layers: usize,
    ) -> Result<Self> {
        let w = |name: String, shape: &[Option<usize>]| -> Result<B::Weight> {
            be.weight(ckpt.expect(&name, shape)?)
        };
        let h = c.hidden;
        let e = format!("{prefix}embeddings.");
        let words = w(
            format!("{e}word_embeddings.weight"),
            &[Some(vocab), Some(h)],
        )?;
        let positions = w(
            format!("{e}position_embeddings.weight"),
            &[Some(c.max_positions), Some(h)],
        )?;
        let types = match ckpt.get(&format!("{e}token_type_embeddings.weight")) {
            Some(_) => Some(w(
                format!("{e}token_type_embeddings.weight"),
                &[Some(c.type_vocab), Some(h)],
            )?),
            None => None,
        };
        let norm0 = norm(be, ckpt, &format!("{e}LayerNorm"), h)?;
        let mut blocks = Vec::with_capacity(layers);
        for layer in 0..layers {
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
            blocks.push(Block {
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
            words,
            positions,
            types,
            norm: norm0,
            blocks,
        })
    }

    /// Runs embeddings and blocks over `batch`, handing each needed capture point to `capture`.
    pub fn forward(
        &self,
        be: &B,
        batch: &Batch,
        need: &Need,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<()> {
        let c = &self.cfg;
        let Some(last) = need.last() else {
            return Ok(());
        };
        let mut e = be.zeros(batch.ids.len(), c.hidden);
        be.embed(&mut e, &self.words, &batch.ids, "word_embeddings")?;
        match &self.types {
            Some(t) => be.embed(&mut e, t, &batch.type_ids, "token_type_embeddings")?,
            None if batch.type_ids.iter().any(|&t| t != 0) => {
                return Err(Error::data("the tokenizer produced token type ids but the checkpoint has no token_type_embeddings"))
            }
            None => {}
        }
        be.embed(
            &mut e,
            &self.positions,
            &batch.positions,
            "position_embeddings",
        )?;
        let mut h = be.layer_norm(&e, &self.norm.0, &self.norm.1, c.eps);
        drop(e);
        let heads = Heads {
            heads: c.heads,
            kv_heads: c.heads,
            head_dim: c.hidden / c.heads,
        };
        for (layer, b) in self.blocks.iter().enumerate().take(last.0 + 1) {
            if need.get(layer, Point::AttnIn) {
                capture(layer, Point::AttnIn, &h)?;
            }
            if last == (layer, Point::AttnIn) {
                break;
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
                capture(layer, Point::AttnOut, &ctx)?;
            }
            if last == (layer, Point::AttnOut) {
                break;
            }
            let a = be.add_layer_norm(
                b.attn_out.apply(be, &ctx),
                &h,
                &b.attn_norm.0,
                &b.attn_norm.1,
                c.eps,
            );
            if need.get(layer, Point::MlpIn) {
                capture(layer, Point::MlpIn, &a)?;
            }
            if last == (layer, Point::MlpIn) {
                break;
            }
            let mut i = b.intermediate.apply(be, &a);
            be.activate(&mut i, c.act);
            if need.get(layer, Point::MlpHidden) {
                capture(layer, Point::MlpHidden, &i)?;
            }
            if last == (layer, Point::MlpHidden) {
                break;
            }
            h = be.add_layer_norm(
                b.output.apply(be, &i),
                &a,
                &b.out_norm.0,
                &b.out_norm.1,
                c.eps,
            );
        }
        Ok(())
    }
}
