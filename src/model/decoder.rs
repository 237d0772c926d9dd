//! The Llama-style decoders (llama, mistral, qwen2, qwen3, gemma3, phi3): RMSNorm, RoPE,
//! grouped-query causal attention (optionally with a sliding window), a gated MLP, and the
//! variants of the newer families: per-head q/k norms (Qwen3, Gemma 3), Gemma's `1 + w` norms,
//! scaled embeddings, four norms per block and per-layer-type RoPE, Phi-3's fused projections.
//! Follows transformers' `modeling_llama.py`, `modeling_qwen3.py`, `modeling_gemma3.py` and
//! `modeling_phi3.py`; only the blocks run (no final norm, no LM head).
//!
//! A block is an [`Attention`] and a feed-forward part ([`Ffn`]); the attention is shared by
//! every family, the feed-forward part is where a family's MLP slots in: dense, or a mixture of
//! experts (mixtral, qwen2_moe, qwen3_moe: [`super::moe`]).

use super::checkpoint::Checkpoint;
use super::config::DecoderConfig;
use super::moe::{self, Moe};
use super::{Batch, Capture, Linear, Module, Need, Point};
use crate::device::backend::{AttentionMask, Backend, Heads, Segments};
use crate::device::host::HostTensor;
use crate::Result;
use std::ops::Range;

/// The self-attention of a block: q/k/v projections (separate, or rows of Phi-3's fused
/// `qkv_proj`), optional per-head q/k RMSNorms, RoPE, attention, and o_proj.
pub struct Attention<W> {
    q: Linear<W>,
    k: Linear<W>,
    v: Linear<W>,
    o: Linear<W>,
    q_norm: Option<W>,
    k_norm: Option<W>,
}

/// The dense gated MLP: `down(act(gate(x)) ⊙ up(x))` (gate and up separate, or the two halves
/// of Phi-3's fused `gate_up_proj`).
pub struct DenseMlp<W> {
    gate: Linear<W>,
    up: Linear<W>,
    down: Linear<W>,
}

/// A block's feed-forward part.
pub enum Ffn<W> {
    Dense(DenseMlp<W>),
    /// A mixture-of-experts block (its router, experts and shared expert).
    Sparse(Moe<W>),
}

/// Whether block `layer` has a mixture-of-experts MLP.
fn sparse(c: &DecoderConfig, layer: usize) -> bool {
    c.moe.as_ref().is_some_and(|m| m.sparse[layer])
}

/// Block `layer`'s linear layers in model order: the attention's, then the dense MLP's (a
/// sparse block's are [`moe::modules`]).
fn block_linears(c: &DecoderConfig, layer: usize) -> Vec<Lin> {
    if sparse(c, layer) {
        attention_linears(c)
    } else {
        linears(c)
    }
}

/// One transformer block's weights.
struct Block<W> {
    input_norm: W,
    attn: Attention<W>,
    /// Gemma 3: the norm of the attention output before the residual add.
    post_attn_norm: Option<W>,
    /// The norm into the MLP (`post_attention_layernorm`; Gemma 3 `pre_feedforward_layernorm`).
    mlp_norm: W,
    ffn: Ffn<W>,
    /// Gemma 3: the norm of the MLP output before the residual add.
    post_mlp_norm: Option<W>,
}

/// A loaded slice of a decoder: blocks `first..first + blocks.len()`, and the embedding table
/// when the slice starts at block 0.
pub struct Decoder<B: Backend> {
    cfg: DecoderConfig,
    embed: Option<B::Weight>,
    first: usize,
    blocks: Vec<Block<B::Weight>>,
}

/// One linear layer of a block: its module suffix, capture point, shape and bias.
#[derive(Clone, Copy, Debug)]
pub struct Lin {
    pub suffix: &'static str,
    pub point: Point,
    pub input: usize,
    pub output: usize,
    pub bias: bool,
}

/// The attention's linear layers in model order.
pub fn attention_linears(c: &DecoderConfig) -> Vec<Lin> {
    let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    let lin = |suffix, point, input, output, bias| Lin {
        suffix,
        point,
        input,
        output,
        bias,
    };
    let mut out = if c.fused {
        vec![lin(
            "self_attn.qkv_proj",
            Point::AttnIn,
            c.hidden,
            q + 2 * kv,
            c.qkv_bias,
        )]
    } else {
        vec![
            lin("self_attn.q_proj", Point::AttnIn, c.hidden, q, c.qkv_bias),
            lin("self_attn.k_proj", Point::AttnIn, c.hidden, kv, c.qkv_bias),
            lin("self_attn.v_proj", Point::AttnIn, c.hidden, kv, c.qkv_bias),
        ]
    };
    out.push(lin(
        "self_attn.o_proj",
        Point::AttnOut,
        q,
        c.hidden,
        c.o_bias,
    ));
    out
}

/// The dense MLP's linear layers in model order.
pub fn mlp_linears(c: &DecoderConfig) -> Vec<Lin> {
    let lin = |suffix, point, input, output| Lin {
        suffix,
        point,
        input,
        output,
        bias: c.mlp_bias,
    };
    let mut out = if c.fused {
        vec![lin(
            "mlp.gate_up_proj",
            Point::MlpIn,
            c.hidden,
            2 * c.intermediate,
        )]
    } else {
        vec![
            lin("mlp.gate_proj", Point::MlpIn, c.hidden, c.intermediate),
            lin("mlp.up_proj", Point::MlpIn, c.hidden, c.intermediate),
        ]
    };
    out.push(lin(
        "mlp.down_proj",
        Point::MlpHidden,
        c.intermediate,
        c.hidden,
    ));
    out
}

/// The block's linear layers in model order.
fn linears(c: &DecoderConfig) -> Vec<Lin> {
    let mut out = attention_linears(c);
    out.extend(mlp_linears(c));
    out
}

/// Every linear layer inside the blocks, in model order, from the configuration (their
/// tensors are checked against the checkpoint when a slice holding them is loaded).
pub fn modules(c: &DecoderConfig, prefix: &str) -> Vec<Module> {
    let mut out = Vec::new();
    let dense_targets = c.moe.as_ref().is_none_or(|m| m.dense_targets);
    for layer in 0..c.layers {
        let targets = block_linears(c, layer)
            .into_iter()
            .filter(|l| dense_targets || !l.suffix.starts_with("mlp."));
        for l in targets {
            out.push(Module {
                name: format!("{prefix}layers.{layer}.{}", l.suffix),
                layer,
                point: l.point,
                in_features: l.input,
                out_features: l.output,
                expert: None,
            });
        }
        if let Some(m) = c.moe.as_ref().filter(|_| sparse(c, layer)) {
            out.extend(moe::modules(c, m, prefix, layer));
        }
    }
    out
}

/// Parameters of one block: its linear layers (with biases) and its norm weights.
pub fn block_parameters(c: &DecoderConfig, layer: usize) -> u64 {
    let experts = match &c.moe {
        Some(m) if sparse(c, layer) => moe::parameters(c, m),
        _ => 0,
    };
    let linear: u64 = block_linears(c, layer)
        .iter()
        .map(|l| (l.input * l.output + if l.bias { l.output } else { 0 }) as u64)
        .sum::<u64>()
        + experts;
    let norms =
        if c.sandwich { 4 } else { 2 } * c.hidden + if c.qk_norm { 2 * c.head_dim } else { 0 };
    linear + norms as u64
}

/// Reads the weights of one block from the checkpoint onto a backend.
pub struct Loader<'a, B: Backend> {
    pub be: &'a B,
    pub c: &'a DecoderConfig,
    pub ckpt: &'a Checkpoint,
    /// `{prefix}layers.{layer}.`
    pub base: String,
}

impl<B: Backend> Loader<'_, B> {
    /// A tensor of the block, checked against `shape`.
    pub fn tensor(&self, suffix: &str, shape: &[Option<usize>]) -> Result<&HostTensor> {
        self.ckpt.expect(&format!("{}{suffix}", self.base), shape)
    }

    /// A weight of the block.
    pub fn weight(&self, suffix: &str, shape: &[Option<usize>]) -> Result<B::Weight> {
        self.be.weight(self.tensor(suffix, shape)?)
    }

    /// An RMSNorm weight of `dim` features; Gemma's `1 + w`, computed in f32 as its RMSNorm does.
    pub fn norm(&self, suffix: &str, dim: usize) -> Result<B::Weight> {
        let t = self.tensor(suffix, &[Some(dim)])?;
        if !self.c.norm_offset {
            return self.be.weight(t);
        }
        let w: Vec<f32> = t.to_f32()?.into_iter().map(|w| 1.0 + w).collect();
        self.be
            .weight(&HostTensor::from_f32(t.name.clone(), t.shape.clone(), &w)?)
    }

    /// The linear layers `lin` of the block, split where the checkpoint fuses them: `parts`
    /// gives each part's output rows of the fused weight (one part: the whole layer).
    pub fn linear(&self, lin: &Lin, parts: &[usize]) -> Result<Vec<Linear<B::Weight>>> {
        let w = self.tensor(
            &format!("{}.weight", lin.suffix),
            &[Some(lin.output), Some(lin.input)],
        )?;
        let b = if lin.bias {
            Some(self.tensor(&format!("{}.bias", lin.suffix), &[Some(lin.output)])?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(parts.len());
        let mut start = 0;
        for &rows in parts {
            let range = start..start + rows;
            start += rows;
            let (w, b) = if parts.len() == 1 {
                (
                    self.be.weight(w)?,
                    b.map(|b| self.be.weight(b)).transpose()?,
                )
            } else {
                let part = |t: &HostTensor| -> Result<B::Weight> {
                    let name = format!("{} rows {range:?}", t.name);
                    if t.shape.len() == 1 {
                        let v = t.to_f32()?[range.clone()].to_vec();
                        self.be.weight(&HostTensor::from_f32(name, vec![rows], &v)?)
                    } else {
                        self.be.weight(&t.row_slice(range.clone(), name))
                    }
                };
                (part(w)?, b.map(part).transpose()?)
            };
            out.push(Linear { w, b });
        }
        Ok(out)
    }
}

impl<W> Attention<W> {
    /// Loads the attention of a block.
    pub fn load<B: Backend<Weight = W>>(l: &Loader<'_, B>) -> Result<Self> {
        let c = l.c;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let lins = attention_linears(c);
        let (mut qkv, o) = if c.fused {
            (l.linear(&lins[0], &[q, kv, kv])?, &lins[1])
        } else {
            let mut parts = Vec::new();
            for lin in &lins[..3] {
                parts.extend(l.linear(lin, &[lin.output])?);
            }
            (parts, &lins[3])
        };
        let o = l.linear(o, &[o.output])?.remove(0);
        let v = qkv.pop().expect("three parts");
        let k = qkv.pop().expect("three parts");
        let q = qkv.pop().expect("three parts");
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(l.norm("self_attn.q_norm.weight", c.head_dim)?),
                Some(l.norm("self_attn.k_norm.weight", c.head_dim)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            q,
            k,
            v,
            o,
            q_norm,
            k_norm,
        })
    }

    /// The attention output of layer `layer` for the normalized input `x`, before `o_proj`.
    pub fn attend<B: Backend<Weight = W>>(
        &self,
        be: &B,
        c: &DecoderConfig,
        layer: usize,
        x: &B::Tensor,
        tables: &B::RopeTables,
        segments: &Segments,
    ) -> B::Tensor {
        let mut q = self.q.apply(be, x);
        let mut k = self.k.apply(be, x);
        let v = self.v.apply(be, x);
        if let Some(w) = &self.q_norm {
            q = head_norm(be, q, w, c.head_dim, c.eps);
        }
        if let Some(w) = &self.k_norm {
            k = head_norm(be, k, w, c.head_dim, c.eps);
        }
        be.rope(&mut q, c.head_dim, tables);
        be.rope(&mut k, c.head_dim, tables);
        let heads = Heads {
            scale: c.attn_scale,
            softcap: c.softcap,
            ..Heads::new(c.heads, c.kv_heads, c.head_dim)
        };
        be.attention(
            &q,
            &k,
            &v,
            heads,
            segments,
            AttentionMask::Causal {
                window: c.windows[layer],
            },
        )
    }

    /// `o_proj` of the attention output.
    pub fn output<B: Backend<Weight = W>>(&self, be: &B, attn: &B::Tensor) -> B::Tensor {
        self.o.apply(be, attn)
    }
}

/// RMSNorm over each head of `x` (`[tokens, heads·hd]`), as Qwen3's and Gemma 3's q/k norms.
fn head_norm<B: Backend>(be: &B, x: B::Tensor, w: &B::Weight, hd: usize, eps: f32) -> B::Tensor {
    let cols = be.dim(&x);
    let y = be.rms_norm(&be.reshape(x, hd), w, eps);
    be.reshape(y, cols)
}

/// Which capture points a pass delivers, and the one after which it stops.
#[derive(Clone, Copy)]
pub struct Plan<'a> {
    pub need: &'a Need,
    /// `None`: run every block (the next stage needs the output).
    pub last: Option<(usize, Point)>,
}

impl Plan<'_> {
    /// Hands `x` to `capture` when `at` is needed; `true` when the pass stops there.
    pub fn deliver<T>(
        &self,
        at: (usize, Point),
        x: &T,
        capture: &mut Capture<'_, T>,
    ) -> Result<bool> {
        if self.need.get(at.0, at.1) {
            capture(at.0, at.1, x, None)?;
        }
        Ok(self.last == Some(at))
    }
}

impl<W> DenseMlp<W> {
    /// Loads the dense MLP of a block.
    pub fn load<B: Backend<Weight = W>>(l: &Loader<'_, B>) -> Result<Self> {
        let c = l.c;
        let lins = mlp_linears(c);
        let (mut gate_up, down) = if c.fused {
            (
                l.linear(&lins[0], &[c.intermediate, c.intermediate])?,
                &lins[1],
            )
        } else {
            let mut parts = l.linear(&lins[0], &[c.intermediate])?;
            parts.extend(l.linear(&lins[1], &[c.intermediate])?);
            (parts, &lins[2])
        };
        let down = l.linear(down, &[c.hidden])?.remove(0);
        let up = gate_up.pop().expect("two parts");
        let gate = gate_up.pop().expect("two parts");
        Ok(DenseMlp { gate, up, down })
    }
}

impl<W> Ffn<W> {
    /// Runs the feed-forward part of layer `layer` on its normalized input `x` (already
    /// delivered as [`Point::MlpIn`]), delivering its inner capture points; `None` when the
    /// pass stops inside it.
    pub fn forward<B: Backend<Weight = W>>(
        &self,
        be: &B,
        c: &DecoderConfig,
        layer: usize,
        x: &B::Tensor,
        plan: Plan<'_>,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<Option<B::Tensor>> {
        match self {
            Ffn::Dense(m) => {
                let a = be.gated(&m.gate.apply(be, x), &m.up.apply(be, x), c.act);
                if plan.deliver((layer, Point::MlpHidden), &a, capture)? {
                    return Ok(None);
                }
                Ok(Some(m.down.apply(be, &a)))
            }
            Ffn::Sparse(m) => {
                let moe = c.moe.as_ref().expect("a sparse block has a MoE config");
                let full = plan.last.is_none_or(|l| l.0 > layer);
                m.forward(be, moe, c.act, x, layer, plan.need, full, capture)
            }
        }
    }
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
        let embed = if blocks.start == 0 {
            let t = ckpt.expect(
                &format!("{prefix}embed_tokens.weight"),
                &[Some(vocab), Some(c.hidden)],
            )?;
            Some(match c.embed_scale {
                // Gemma's scaled embedding: `table[id] · scale` in f32 is `(table · scale)[id]`.
                Some(s) => {
                    let mut v = t.to_f32()?;
                    v.iter_mut().for_each(|x| *x *= s);
                    be.weight(&HostTensor::from_f32(t.name.clone(), t.shape.clone(), &v)?)?
                }
                None => be.weight(t)?,
            })
        } else {
            None
        };
        let first = blocks.start;
        let mut loaded = Vec::with_capacity(blocks.len());
        for layer in blocks {
            let l = Loader {
                be,
                c,
                ckpt,
                base: format!("{prefix}layers.{layer}."),
            };
            let (post_attn_norm, mlp_norm, post_mlp_norm) = if c.sandwich {
                (
                    Some(l.norm("post_attention_layernorm.weight", c.hidden)?),
                    l.norm("pre_feedforward_layernorm.weight", c.hidden)?,
                    Some(l.norm("post_feedforward_layernorm.weight", c.hidden)?),
                )
            } else {
                (
                    None,
                    l.norm("post_attention_layernorm.weight", c.hidden)?,
                    None,
                )
            };
            loaded.push(Block {
                input_norm: l.norm("input_layernorm.weight", c.hidden)?,
                attn: Attention::load(&l)?,
                post_attn_norm,
                mlp_norm,
                ffn: match &c.moe {
                    Some(m) if m.sparse[layer] => Ffn::Sparse(Moe::load(be, c, m, ckpt, &l.base)?),
                    _ => Ffn::Dense(DenseMlp::load(&l)?),
                },
                post_mlp_norm,
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
        let plan = Plan { need, last };
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
        let table = |(cos, sin)| be.rope_tables(cos, sin);
        let global = table(c.rope.tables(&batch.positions));
        let local = c
            .local_rope
            .as_ref()
            .map(|r| table(r.tables(&batch.positions)));
        for (i, b) in self.blocks.iter().enumerate() {
            let layer = self.first + i;
            if last.is_some_and(|l| layer > l.0) {
                break;
            }
            let x = be.rms_norm(&h, &b.input_norm, c.eps);
            if plan.deliver((layer, Point::AttnIn), &x, capture)? {
                return Ok(None);
            }
            let tables = match &local {
                Some(t) if c.sliding[layer] => t,
                _ => &global,
            };
            let attn = b.attn.attend(be, c, layer, &x, tables, &batch.segments);
            drop(x);
            if plan.deliver((layer, Point::AttnOut), &attn, capture)? {
                return Ok(None);
            }
            let mut o = b.attn.output(be, &attn);
            drop(attn);
            if let Some(w) = &b.post_attn_norm {
                o = be.rms_norm(&o, w, c.eps);
            }
            be.add(&mut h, &o);
            let x = be.rms_norm(&h, &b.mlp_norm, c.eps);
            if plan.deliver((layer, Point::MlpIn), &x, capture)? {
                return Ok(None);
            }
            let Some(mut d) = b.ffn.forward(be, c, layer, &x, plan, capture)? else {
                return Ok(None);
            };
            if let Some(w) = &b.post_mlp_norm {
                d = be.rms_norm(&d, w, c.eps);
            }
            be.add(&mut h, &d);
        }
        Ok(output.then_some(h))
    }
}
