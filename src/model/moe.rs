//! Mixture-of-experts MLPs (mixtral, qwen2_moe), as transformers 5 computes them: the router's
//! logits `x Wᵣᵀ`, a softmax in f32, the top-k experts per token (ties to the lower index),
//! optionally renormalized; each expert a SwiGLU MLP over the rows routed to it, its output scaled
//! by the token's routing weight and added back (`index_add_`), experts in ascending order; for
//! Qwen2-MoE a shared expert over every token, scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! Targets follow PEFT: each expert's slice of `mlp.experts.gate_up_proj` reads the rows routed
//! to it ([`Point::ExpertIn`]) and its slice of `mlp.experts.down_proj` their `act(gate) · up`
//! ([`Point::ExpertHidden`]); the shared expert's layers are modules like a dense MLP's. The
//! routed rows are ordered as transformers gathers them: by top-k position, then by token.

use super::checkpoint::Checkpoint;
use super::config::{DecoderConfig, ExpertKeys, MoeConfig};
use super::{Capture, ExpertOf, Linear, Module, Need, Point};
use crate::device::backend::{Activation, Backend};
use crate::device::host::HostTensor;
use crate::Result;

/// One routed expert: gate and up `[f, h]`, down `[h, f]`.
pub struct Expert<W> {
    gate: W,
    up: W,
    down: W,
}

/// The shared expert of a Qwen2-MoE block and its gate `[1, h]`.
pub struct Shared<W> {
    gate: Linear<W>,
    up: Linear<W>,
    down: Linear<W>,
    scale: W,
}

/// A sparse block's MLP.
pub struct Moe<W> {
    router: W,
    experts: Vec<Expert<W>>,
    shared: Option<Shared<W>>,
}

/// The PEFT path of block `layer`'s expert parameter `name` (`gate_up_proj`, `down_proj`).
pub fn param_name(prefix: &str, layer: usize, name: &str) -> String {
    format!("{prefix}layers.{layer}.mlp.experts.{name}")
}

/// The linear layers of a sparse block's MLP in model order: the shared expert's modules, then
/// every expert's slice of `gate_up_proj`, then of `down_proj`.
pub fn modules(c: &DecoderConfig, m: &MoeConfig, prefix: &str, layer: usize) -> Vec<Module> {
    let h = c.hidden;
    let module = |suffix: &str, point, i, o| Module {
        name: format!("{prefix}layers.{layer}.mlp.{suffix}"),
        layer,
        point,
        in_features: i,
        out_features: o,
        expert: None,
    };
    let mut out = Vec::new();
    if let Some(s) = m.shared {
        out.push(module("shared_expert.gate_proj", Point::MlpIn, h, s));
        out.push(module("shared_expert.up_proj", Point::MlpIn, h, s));
        out.push(module("shared_expert.down_proj", Point::MlpHidden, s, h));
        out.push(module("shared_expert_gate", Point::MlpIn, h, 1));
    }
    let f = m.intermediate;
    for (param, i, o) in [("gate_up_proj", h, 2 * f), ("down_proj", f, h)] {
        let name = param_name(prefix, layer, param);
        for e in 0..m.experts {
            out.push(Module {
                name: format!("{name}[{e}]"),
                layer,
                point: if param == "down_proj" {
                    Point::ExpertHidden(e as u32)
                } else {
                    Point::ExpertIn(e as u32)
                },
                in_features: i,
                out_features: o,
                expert: Some(ExpertOf {
                    param: name.clone(),
                    expert: e,
                    experts: m.experts,
                }),
            });
        }
    }
    out
}

/// Parameters of a sparse block's MLP: router, experts, shared expert and its gate.
pub fn parameters(c: &DecoderConfig, m: &MoeConfig) -> u64 {
    let h = c.hidden as u64;
    let experts = m.experts as u64 * 3 * h * m.intermediate as u64;
    let shared = m.shared.map_or(0, |s| 3 * h * s as u64 + h);
    m.experts as u64 * h + experts + shared
}

/// Rows `first..first + rows` of a fused `[experts, rows, cols]` parameter as a tensor of its
/// own (an expert's part), without a copy.
fn slice(t: &HostTensor, first: usize, rows: usize) -> HostTensor {
    let name = format!("{}[rows {first}..{}]", t.name, first + rows);
    t.row_slice(first..first + rows, name)
}

impl<W> Moe<W> {
    /// Loads block `base`'s router, experts (fused transformers-5 keys
    /// `mlp.experts.{gate_up,down}_proj`, or one key per expert as checkpoints ship them) and
    /// shared expert.
    pub fn load<B: Backend<Weight = W>>(
        be: &B,
        c: &DecoderConfig,
        m: &MoeConfig,
        ckpt: &Checkpoint,
        base: &str,
    ) -> Result<Self> {
        let (h, f, n) = (c.hidden, m.intermediate, m.experts);
        let w = |t: &HostTensor| be.weight(t);
        let get = |name: String, shape: &[Option<usize>]| -> Result<W> {
            be.weight(ckpt.expect(&name, shape)?)
        };
        let mixtral = m.keys == ExpertKeys::Mixtral;
        let router = if mixtral && !ckpt.has(&format!("{base}mlp.gate.weight")) {
            format!("{base}block_sparse_moe.gate.weight")
        } else {
            format!("{base}mlp.gate.weight")
        };
        let router = get(router, &[Some(n), Some(h)])?;
        let fused = format!("{base}mlp.experts.gate_up_proj");
        let experts = if ckpt.has(&fused) {
            let gate_up = ckpt.expect(&fused, &[Some(n), Some(2 * f), Some(h)])?;
            let down = ckpt.expect(
                &format!("{base}mlp.experts.down_proj"),
                &[Some(n), Some(h), Some(f)],
            )?;
            (0..n)
                .map(|e| {
                    Ok(Expert {
                        gate: w(&slice(gate_up, e * 2 * f, f))?,
                        up: w(&slice(gate_up, e * 2 * f + f, f))?,
                        down: w(&slice(down, e * h, h))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            let (dir, gate, up, down) = if mixtral {
                ("block_sparse_moe.experts", "w1", "w3", "w2")
            } else {
                ("mlp.experts", "gate_proj", "up_proj", "down_proj")
            };
            (0..n)
                .map(|e| {
                    let key = |p: &str| format!("{base}{dir}.{e}.{p}.weight");
                    Ok(Expert {
                        gate: get(key(gate), &[Some(f), Some(h)])?,
                        up: get(key(up), &[Some(f), Some(h)])?,
                        down: get(key(down), &[Some(h), Some(f)])?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let shared = match m.shared {
            None => None,
            Some(s) => {
                let lin = |suffix: &str, o: usize, i: usize| -> Result<Linear<W>> {
                    Ok(Linear {
                        w: get(
                            format!("{base}mlp.shared_expert.{suffix}.weight"),
                            &[Some(o), Some(i)],
                        )?,
                        b: None,
                    })
                };
                Some(Shared {
                    gate: lin("gate_proj", s, h)?,
                    up: lin("up_proj", s, h)?,
                    down: lin("down_proj", h, s)?,
                    scale: get(
                        format!("{base}mlp.shared_expert_gate.weight"),
                        &[Some(1), Some(h)],
                    )?,
                })
            }
        };
        Ok(Moe {
            router,
            experts,
            shared,
        })
    }
}

/// Per expert, the routed `(token, weight)` pairs in transformers' order (top-k position, then
/// token), from the router's logits `[tokens, experts]`: softmax in f32, top-k (ties to the lower
/// expert), divided by their sum with `norm`.
pub fn route(logits: &ndarray::Array2<f32>, top_k: usize, norm: bool) -> Vec<Vec<(usize, f32)>> {
    let (tokens, experts) = logits.dim();
    let mut picks = vec![Vec::new(); top_k];
    for t in 0..tokens {
        let row = logits.row(t);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let probs: Vec<f32> = exps.iter().map(|&e| e / sum).collect();
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let top = &order[..top_k];
        let total: f32 = top.iter().map(|&e| probs[e]).sum();
        for (k, &e) in top.iter().enumerate() {
            let p = if norm { probs[e] / total } else { probs[e] };
            picks[k].push((t, e, p));
        }
    }
    let mut out = vec![Vec::new(); experts];
    for k in picks {
        for (t, e, p) in k {
            out[e].push((t, p));
        }
    }
    out
}

impl<W> Moe<W> {
    /// The block's MLP output for the normalized hidden state `x`, delivering the needed expert
    /// (and shared-expert) points. With `full` the output is computed; without, only what the
    /// needed points take, and `None` is returned (the pass stops after this block).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend<Weight = W>>(
        &self,
        be: &B,
        m: &MoeConfig,
        act: Activation,
        x: &B::Tensor,
        layer: usize,
        need: &Need,
        full: bool,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<Option<B::Tensor>> {
        let tokens = be.tokens(x);
        let all: Vec<usize> = (0..tokens).collect();
        let logits = be.rows(&be.linear(x, &self.router, None), &all);
        // The shared expert's sigmoid gate comes to the host right behind the router's logits,
        // before the experts are queued: on a GPU its download waits for its own small product
        // only, not for every expert's work (the stream drains once per layer).
        let shared_gate: Option<Vec<f32>> = self.shared.as_ref().filter(|_| full).map(|s| {
            let g = be.rows(&be.linear(x, &s.scale, None), &all);
            g.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect()
        });
        let routes = route(&logits, m.top_k, m.norm_topk);
        let mut out = full.then(|| be.zeros(tokens, be.dim(x)));
        for (e, (expert, routed)) in self.experts.iter().zip(&routes).enumerate() {
            let (at_in, at_hidden) = (Point::ExpertIn(e as u32), Point::ExpertHidden(e as u32));
            let (need_in, need_hidden) = (need.get(layer, at_in), need.get(layer, at_hidden));
            if routed.is_empty() || !(full || need_in || need_hidden) {
                continue;
            }
            let idx: Vec<usize> = routed.iter().map(|r| r.0).collect();
            let xe = be.gather(x, &idx);
            if need_in {
                capture(layer, at_in, &xe, Some(&idx))?;
            }
            if !(full || need_hidden) {
                continue;
            }
            let a = be.gated(
                &be.linear(&xe, &expert.gate, None),
                &be.linear(&xe, &expert.up, None),
                act,
            );
            drop(xe);
            if need_hidden {
                capture(layer, at_hidden, &a, Some(&idx))?;
            }
            if let Some(out) = out.as_mut() {
                let y = be.linear(&a, &expert.down, None);
                let w: Vec<f32> = routed.iter().map(|r| r.1).collect();
                be.scatter_add(out, &y, &idx, &w);
            }
        }
        if let Some(s) = &self.shared {
            if full || need.get(layer, Point::MlpHidden) {
                let a = be.gated(&s.gate.apply(be, x), &s.up.apply(be, x), act);
                if need.get(layer, Point::MlpHidden) {
                    capture(layer, Point::MlpHidden, &a, None)?;
                }
                if let (Some(out), Some(w)) = (out.as_mut(), &shared_gate) {
                    let y = s.down.apply(be, &a);
                    be.scatter_add(out, &y, &all, w);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn routing_is_softmax_top_k_in_transformers_order() {
        // Token 0 prefers experts 2 then 0; token 1 experts 0 then 1 (a tie 1 = 2 goes to 1).
        let logits = array![[1.0f32, -1.0, 2.0], [3.0, 0.5, 0.5]];
        let r = route(&logits, 2, false);
        let p0: Vec<f64> = [1.0f64, -1.0, 2.0].iter().map(|x| x.exp()).collect();
        let s0: f64 = p0.iter().sum();
        // Expert 0: token 1 at position 0, then token 0 at position 1.
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((r[0][1].1 as f64 - p0[0] / s0).abs() < 1e-6);
        assert_eq!(r[1].iter().map(|x| x.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(r[2].iter().map(|x| x.0).collect::<Vec<_>>(), vec![0]);
        let n = route(&logits, 2, true);
        assert!((n[2][0].1 + n[0][1].1 - 1.0).abs() < 1e-6);
        assert!((n[2][0].1 as f64 - p0[2] / (p0[2] + p0[0])).abs() < 1e-6);
    }
}
