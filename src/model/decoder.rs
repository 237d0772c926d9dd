//! The Llama-family decoder (llama, mistral, qwen2): RMSNorm, RoPE, grouped-query causal
//! attention (optionally with a sliding window), SwiGLU MLP. Follows transformers'
//! `modeling_llama.py`; only the blocks run (no final norm, no LM head).

use super::checkpoint::Checkpoint;
use super::config::DecoderConfig;
use super::{Batch, Capture, Linear, Module, Need, Point};
use crate::device::backend::{AttentionMask, Backend, Heads};
use crate::Result;
use std::ops::Range;

/// One transformer block's weights.
struct Block<W> {
    input_norm: W,
    q: Linear<W>,
    k: Linear<W>,
    v: Linear<W>,
    o: Linear<W>,
    post_norm: W,
    gate: Linear<W>,
    up: Linear<W>,
    down: Linear<W>,
}

/// A loaded slice of a decoder: blocks `first..first + blocks.len()`, and the embedding table
/// when the slice starts at block 0.
pub struct Decoder<B: Backend> {
    cfg: DecoderConfig,
    embed: Option<B::Weight>,
    first: usize,
    blocks: Vec<Block<B::Weight>>,
}

/// The block's linear layers in model order: (suffix, point, in, out, has bias).
fn linears(c: &DecoderConfig) -> [(&'static str, Point, usize, usize, bool); 7] {
    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    [
        ("self_attn.q_proj", Point::AttnIn, c.hidden, q, c.qkv_bias),
        ("self_attn.k_proj", Point::AttnIn, c.hidden, kv, c.qkv_bias),
        ("self_attn.v_proj", Point::AttnIn, c.hidden, kv, c.qkv_bias),
        ("self_attn.o_proj", Point::AttnOut, q, c.hidden, c.o_bias),
        (
            "mlp.gate_proj",
            Point::MlpIn,
            c.hidden,
            c.intermediate,
            c.mlp_bias,
        ),
        (
            "mlp.up_proj",
            Point::MlpIn,
            c.hidden,
            c.intermediate,
            c.mlp_bias,
        ),
        (
            "mlp.down_proj",
            Point::MlpHidden,
            c.intermediate,
            c.hidden,
            c.mlp_bias,
        ),
    ]
}

/// Every linear layer inside the blocks, in model order, from the configuration (their
/// tensors are checked against the checkpoint when a slice holding them is loaded).
pub fn modules(c: &DecoderConfig, prefix: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for layer in 0..c.layers {
        for (suffix, point, i, o, _) in linears(c) {
            out.push(Module {
                name: format!("{prefix}layers.{layer}.{suffix}"),
                layer,
                point,
                in_features: i,
                out_features: o,
            });
        }
    }
    out
}

/// Parameters of one block: its linear layers (with biases) and two RMSNorm weights.
pub fn block_parameters(c: &DecoderConfig) -> u64 {
    let linear: u64 = linears(c)
        .iter()
        .map(|&(_, _, i, o, bias)| (i * o + if bias { o } else { 0 }) as u64)
        .sum();
    linear + 2 * c.hidden as u64
}

impl<B: Backend> Decoder<B> {
    /// Loads blocks `blocks`, and the embedding table if they start at block 0.
    pub fn load(
        be: &B,
        c: &DecoderConfig,
        vocab: usize,
        ckpt: &Checkpoint,
        prefix: &str,
        blocks: Range<usize>,
    ) -> Result<Self> {
        let w = |name: String, shape: &[Option<usize>]| -> Result<B::Weight> {
            be.weight(ckpt.expect(&name, shape)?)
        };
        let embed = if blocks.start == 0 {
            Some(w(
                format!("{prefix}embed_tokens.weight"),
                &[Some(vocab), Some(c.hidden)],
            )?)
        } else {
            None
        };
        let first = blocks.start;
        let mut loaded = Vec::with_capacity(blocks.len());
        for layer in blocks {
            let base = format!("{prefix}layers.{layer}.");
            let lin = |suffix: &str| -> Result<Linear<B::Weight>> {
                let (_, _, i, o, bias) = linears(c)
                    .into_iter()
                    .find(|l| l.0 == suffix)
                    .expect("known suffix");
                Ok(Linear {
                    w: w(format!("{base}{suffix}.weight"), &[Some(o), Some(i)])?,
                    b: if bias {
                        Some(w(format!("{base}{suffix}.bias"), &[Some(o)])?)
                    } else {
                        None
                    },
                })
            };
            loaded.push(Block {
                input_norm: w(format!("{base}input_layernorm.weight"), &[Some(c.hidden)])?,
                q: lin("self_attn.q_proj")?,
                k: lin("self_attn.k_proj")?,
                v: lin("self_attn.v_proj")?,
                o: lin("self_attn.o_proj")?,
                post_norm: w(
                    format!("{base}post_attention_layernorm.weight"),
                    &[Some(c.hidden)],
                )?,
                gate: lin("mlp.gate_proj")?,
                up: lin("mlp.up_proj")?,
                down: lin("mlp.down_proj")?,
            });
        }
        Ok(Decoder {
            cfg: c.clone(),
            embed,
            first,
            blocks: loaded,
        })
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
            None => {
                let embed = self.embed.as_ref().ok_or_else(|| crate::Error::Comm(format!("decoder slice from block {} has no embeddings and was given no hidden state", self.first)))?;
                let mut h = be.zeros(batch.ids.len(), c.hidden);
                be.embed(&mut h, embed, &batch.ids, "embed_tokens")?;
                h
            }
        };
        // Positions restart at 0 in every sequence (right padding, as transformers with
        // an attention mask and no explicit position_ids).
        let (cos, sin) = c.rope.tables(&batch.positions);
        let tables = be.rope_tables(cos, sin);
        let heads = Heads::new(c.heads, c.kv_heads, c.head_dim);
        for (i, b) in self.blocks.iter().enumerate() {
            let layer = self.first + i;
            if last.is_some_and(|l| layer > l.0) {
                break;
            }
            let x = be.rms_norm(&h, &b.input_norm, c.eps);
            if need.get(layer, Point::AttnIn) {
                capture(layer, Point::AttnIn, &x)?;
            }
            if stop((layer, Point::AttnIn)) {
                return Ok(None);
            }
            let mut q = b.q.apply(be, &x);
            let mut k = b.k.apply(be, &x);
            let v = b.v.apply(be, &x);
            drop(x);
            be.rope(&mut q, c.head_dim, &tables);
            be.rope(&mut k, c.head_dim, &tables);
            let attn = be.attention(
                &q,
                &k,
                &v,
                heads,
                &batch.segments,
                AttentionMask::Causal {
                    window: c.windows[layer],
                },
            );
            if need.get(layer, Point::AttnOut) {
                capture(layer, Point::AttnOut, &attn)?;
            }
            if stop((layer, Point::AttnOut)) {
                return Ok(None);
            }
            let o = b.o.apply(be, &attn);
            be.add(&mut h, &o);
            let x = be.rms_norm(&h, &b.post_norm, c.eps);
            if need.get(layer, Point::MlpIn) {
                capture(layer, Point::MlpIn, &x)?;
            }
            if stop((layer, Point::MlpIn)) {
                return Ok(None);
            }
            let a = be.gated(&b.gate.apply(be, &x), &b.up.apply(be, &x), c.act);
            if need.get(layer, Point::MlpHidden) {
                capture(layer, Point::MlpHidden, &a)?;
            }
            if stop((layer, Point::MlpHidden)) {
                return Ok(None);
            }
            let d = b.down.apply(be, &a);
            be.add(&mut h, &d);
        }
        Ok(output.then_some(h))
    }
}
