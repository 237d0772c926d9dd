//! The Llama-family decoder (llama, mistral, qwen2): RMSNorm, RoPE, grouped-query causal
//! attention (optionally with a sliding window), SwiGLU MLP. Follows transformers'
//! `modeling_llama.py`; only the blocks run (no final norm, no LM head).

use super::checkpoint::Checkpoint;
use super::config::DecoderConfig;
use super::ops::{AttentionMask, Backend, Heads};
use super::{Batch, Capture, Linear, Module, Need, Point};
use crate::Result;

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

/// A loaded decoder.
pub struct Decoder<B: Backend> {
    cfg: DecoderConfig,
    embed: B::Weight,
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

/// Every linear layer inside the blocks, in model order, checked against the checkpoint.
pub fn modules(c: &DecoderConfig, ckpt: &Checkpoint, prefix: &str) -> Result<Vec<Module>> {
    let mut out = Vec::new();
    for layer in 0..c.layers {
        for (suffix, point, i, o, bias) in linears(c) {
            let name = format!("{prefix}layers.{layer}.{suffix}");
            ckpt.expect(&format!("{name}.weight"), &[Some(o), Some(i)])?;
            if bias {
                ckpt.expect(&format!("{name}.bias"), &[Some(o)])?;
            }
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

impl<B: Backend> Decoder<B> {
    /// Loads the embedding table and the first `layers` blocks.
    pub fn load(
        be: &B,
        c: &DecoderConfig,
        vocab: usize,
        ckpt: &Checkpoint,
        prefix: &str,
        layers: usize,
    ) -> Result<Self> {
        let w = |name: String, shape: &[Option<usize>]| -> Result<B::Weight> {
            be.weight(ckpt.expect(&name, shape)?)
        };
        let embed = w(
            format!("{prefix}embed_tokens.weight"),
            &[Some(vocab), Some(c.hidden)],
        )?;
        let mut blocks = Vec::with_capacity(layers);
        for layer in 0..layers {
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
            blocks.push(Block {
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
            blocks,
        })
    }

    /// Runs the blocks over `batch`, handing each needed capture point to `capture`, and stops
    /// after the last one needed.
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
        let mut h = be.zeros(batch.ids.len(), c.hidden);
        be.embed(&mut h, &self.embed, &batch.ids, "embed_tokens")?;
        // Positions restart at 0 in every sequence (right padding, as transformers with
        // an attention mask and no explicit position_ids).
        let (cos, sin) = c.rope.tables(&batch.positions);
        let heads = Heads {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        for (layer, b) in self.blocks.iter().enumerate().take(last.0 + 1) {
            let x = be.rms_norm(&h, &b.input_norm, c.eps);
            if need.get(layer, Point::AttnIn) {
                capture(layer, Point::AttnIn, &x)?;
            }
            if last == (layer, Point::AttnIn) {
                break;
            }
            let mut q = b.q.apply(be, &x);
            let mut k = b.k.apply(be, &x);
            let v = b.v.apply(be, &x);
            drop(x);
            be.rope(&mut q, c.head_dim, &cos, &sin);
            be.rope(&mut k, c.head_dim, &cos, &sin);
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
            if last == (layer, Point::AttnOut) {
                break;
            }
            let o = b.o.apply(be, &attn);
            be.add(&mut h, &o);
            let x = be.rms_norm(&h, &b.post_norm, c.eps);
            if need.get(layer, Point::MlpIn) {
                capture(layer, Point::MlpIn, &x)?;
            }
            if last == (layer, Point::MlpIn) {
                break;
            }
            let a = be.gated(&b.gate.apply(be, &x), &b.up.apply(be, &x), c.act);
            if need.get(layer, Point::MlpHidden) {
                capture(layer, Point::MlpHidden, &a)?;
            }
            if last == (layer, Point::MlpHidden) {
                break;
            }
            let d = b.down.apply(be, &a);
            be.add(&mut h, &d);
        }
        Ok(())
    }
}
