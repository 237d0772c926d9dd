//! The tensor operations the forward passes are written against, and the types of their
//! arguments.
//!
//! A forward pass (`model::decoder`, `model::encoder`) only calls [`Backend`] methods, so each
//! backend ([`super::cpu::Cpu`], [`super::cuda::Cuda`]) slots in by implementing this trait;
//! nothing else changes.
//!
//! | op | meaning |
//! |---|---|
//! | [`Backend::weight`] | a checkpoint tensor, decoded to f32, resident where the backend computes |
//! | [`Backend::embed`] | rows of an embedding table (`out += table[ids]`) |
//! | [`Backend::linear`] | `x Wᵀ + b` (PyTorch's `nn.Linear`) |
//! | [`Backend::add`] | `x += y` (residual connections) |
//! | [`Backend::reshape`] | the same values as `[tokens·cols/c, c]` (per-head ops: q/k norms) |
//! | [`Backend::rms_norm`], [`Backend::layer_norm`], [`Backend::add_layer_norm`] | per-token normalization (the last after a residual add) |
//! | [`Backend::rope`] | rotary position embedding (HF's `rotate_half` layout; partial rotary) |
//! | [`Backend::attention`] | scaled dot-product attention per sequence and head, causal or bidirectional, GQA |
//! | [`Backend::activate`], [`Backend::gated`] | GELU / SiLU / ReLU, and `act(gate) ⊙ up` |
//! | [`Backend::gather`], [`Backend::scatter_add`] | a mixture-of-experts block's routed rows, and its experts' weighted outputs added back (`index_add_`) |
//! | [`Backend::rows`], [`Backend::host_view`] | selected token rows copied to host memory; all rows without a copy where possible |
//!
//! Activations are 2-D: `[tokens, features]`, the tokens of all sequences of a batch packed one
//! after another (no padding is materialized; [`Segments`] says where each sequence lies).

use super::host::HostTensor;
use crate::Result;
use ndarray::{Array2, ArrayView2};
use std::ops::Range;

/// Activation functions by their HF `hidden_act` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` (`silu`, `swish`).
    Silu,
    /// `x · Φ(x)` with the exact error function (`gelu`).
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses an HF `hidden_act` value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    /// Applies the function to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + exp(-x)),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                // transformers' NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³))).
                const C: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
        }
    }
}

/// `e^x` in f32 without a libm call, so that loops over slices vectorize: Cephes' `expf`
/// (range reduction `x = n·ln2 + r` with a two-part ln2, a degree-5 polynomial for `e^r`,
/// `2^n` built in the exponent bits, no float-to-int conversion); relative error below 3e-7.
/// Inputs below -87.33 give 0 (where PyTorch's masked scores and GELU tails land); inputs above
/// 88.37 saturate at 2.5e38.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: m = x·log2(e) + ROUND holds round(x·log2 e) in its low bits.
    let under = x < -87.336_55;
    let x = x.clamp(-87.336_55, 88.37);
    let m = x * LOG2E + ROUND;
    let n = m - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [-126, 127]: 2^n = bits (n + 127) << 23, with n = bits(m) - bits(ROUND).
    let scale = f32::from_bits((m.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127)) << 23);
    if under {
        0.0
    } else {
        e * scale
    }
}

/// The error function as PyTorch's vectorized CPU kernels compute it (ATen `Vectorized<float>::erf`:
/// Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7), so GELU here rounds like PyTorch's
/// and costs one `exp`.
#[inline]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (P * ax + 1.0);
    let r = (((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0];
    let y = 1.0 - r * t * exp(-ax * ax);
    y.copysign(x)
}

/// [`Backend::embed`]'s shapes: one id per row of the activation, and table rows of its width.
/// A mismatch is a data error naming `what` (a GPU would read past the table's rows).
pub fn check_embed(what: &str, table: &[usize], x: (usize, usize), ids: usize) -> Result<()> {
    if table.len() != 2 || table[1] != x.1 || ids != x.0 {
        return Err(crate::Error::data(format!(
            "{what}: {ids} ids into a table of shape {table:?} for an activation of {} rows x {} features (expected one id per row and rows of {} values)",
            x.0, x.1, x.1
        )));
    }
    Ok(())
}

/// A norm's weight or bias must hold one value per feature (`d`); else the message saying so
/// (a GPU would read past a shorter one, the CPU would pair values with the wrong features).
pub fn norm_mismatch(what: &str, shape: &[usize], d: usize) -> Option<String> {
    (shape != [d]).then(|| {
        format!("the {what} has shape {shape:?}, the activation {d} features (expected [{d}])")
    })
}

/// Where each sequence of a packed batch lies: sequence `i` owns tokens `ranges[i]`.
#[derive(Clone, Debug, Default)]
pub struct Segments {
    /// Token ranges, contiguous and in order.
    pub ranges: Vec<Range<usize>>,
}

impl Segments {
    /// Segments of consecutive sequences of the given lengths.
    pub fn from_lengths(lengths: impl IntoIterator<Item = usize>) -> Self {
        let mut start = 0;
        let ranges = lengths
            .into_iter()
            .map(|n| {
                let r = start..start + n;
                start += n;
                r
            })
            .collect();
        Segments { ranges }
    }

    /// Total tokens.
    pub fn tokens(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.end)
    }
}

/// Which keys a query may attend to, within its own sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every token of the sequence (BERT; padding is never attended because it is not there).
    Bidirectional,
    /// Keys `j ≤ i`, and with `Some(w)` also `j > i - w` (Mistral's sliding window, as in
    /// transformers' `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`).
    Causal { window: Option<usize> },
}

/// Head layout and score rule of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` must be a multiple; GQA shares each among `heads / kv_heads`).
    pub kv_heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// The scores' factor: `q·k · scale` (transformers' `scaling`: `head_dim^-0.5`, Gemma 3's
    /// `query_pre_attn_scalar^-0.5`).
    pub scale: f32,
    /// Logit soft-capping: scores become `cap · tanh(score / cap)` before the mask (Gemma's
    /// `attn_logit_softcapping`); `None` leaves them.
    pub softcap: Option<f32>,
}

impl Heads {
    /// `heads` query heads sharing `kv_heads` key/value heads of `head_dim` features, with the
    /// usual `head_dim^-0.5` scale and no soft-capping.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        Heads {
            heads,
            kv_heads,
            head_dim,
            scale: Self::default_scale(head_dim),
            softcap: None,
        }
    }

    /// `head_dim^-0.5` as transformers passes it (`self.head_dim**-0.5`, a Python float) to an
    /// f32 attention: computed in f64, rounded once. At head_dim 24, 96 (Phi-3) and 112 this is
    /// 1 ulp above the f32 `1 / sqrt(head_dim)`.
    pub fn default_scale(head_dim: usize) -> f32 {
        (head_dim as f64).powf(-0.5) as f32
    }
}

/// Precomputed rotary tables: `cos`/`sin` of `position · inv_freq[i]` for `i < head_dim / 2`
/// (fewer with partial rotary).
#[derive(Clone, Debug)]
pub struct Rope {
    /// Inverse frequencies (`rotary dims / 2`), after any scaling rule.
    pub inv_freq: Vec<f32>,
    /// The factor of cos and sin (transformers' `attention_scaling`: LongRoPE's attention
    /// factor; 1 for the other types).
    pub scaling: f32,
    /// LongRoPE's long frequencies and the original context: a batch whose largest position is
    /// at least `original` uses them (transformers' `longrope_frequency_update`:
    /// `max(position_ids) + 1 > original_max_position_embeddings`).
    pub long: Option<(Vec<f32>, usize)>,
}

impl Rope {
    /// Plain frequencies, no cos/sin factor.
    pub fn new(inv_freq: Vec<f32>) -> Self {
        Rope {
            inv_freq,
            scaling: 1.0,
            long: None,
        }
    }

    /// The frequencies a batch with these positions uses.
    pub fn frequencies(&self, positions: &[u32]) -> &[f32] {
        let len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        match &self.long {
            Some((long, original)) if len > *original => long,
            _ => &self.inv_freq,
        }
    }

    /// cos and sin of every position in `positions` (`[tokens, head_dim/2]` each), computed as
    /// transformers does: the angle `position · inv_freq` rounded to f32, then cos / sin, times
    /// the scaling.
    pub fn tables(&self, positions: &[u32]) -> (Array2<f32>, Array2<f32>) {
        let freq = self.frequencies(positions);
        let half = freq.len();
        let mut cos = Array2::zeros((positions.len(), half));
        let mut sin = Array2::zeros((positions.len(), half));
        for (t, &p) in positions.iter().enumerate() {
            for (i, &f) in freq.iter().enumerate() {
                let angle = p as f32 * f;
                cos[(t, i)] = angle.cos() * self.scaling;
                sin[(t, i)] = angle.sin() * self.scaling;
            }
        }
        (cos, sin)
    }
}

/// The operations a forward pass needs. `Tensor` is a 2-D f32 activation `[tokens, features]`;
/// `Weight` is a checkpoint tensor (a matrix `[out, in]` or a vector) resident on the device.
pub trait Backend {
    /// Activations.
    type Tensor;
    /// Weights.
    type Weight;
    /// Rotary tables ([`Backend::rope_tables`]).
    type RopeTables;

    /// The rows `idx` of `x`, in order, as a new activation (the tokens routed to an expert).
    fn gather(&self, x: &Self::Tensor, idx: &[usize]) -> Self::Tensor;

    /// `out[idx[i]] += y[i] · w[i]` for every row `i` of `y` (`idx` without repeats): an
    /// expert's outputs, scaled by their routing weights, added to their tokens' rows (PyTorch's
    /// `index_add_(0, idx, y * w)`, the product rounded before the sum).
    fn scatter_add(&self, out: &mut Self::Tensor, y: &Self::Tensor, idx: &[usize], w: &[f32]);

    /// A short name for reports (`cpu`).
    fn name(&self) -> &'static str;
    /// Makes a checkpoint tensor usable (decoding F16/BF16 to f32).
    fn weight(&self, t: &HostTensor) -> Result<Self::Weight>;
    /// A zero activation of `tokens x dim`.
    fn zeros(&self, tokens: usize, dim: usize) -> Self::Tensor;
    /// `x[t] += table[ids[t]]`; an id outside the table is an error naming `what`.
    fn embed(
        &self,
        x: &mut Self::Tensor,
        table: &Self::Weight,
        ids: &[u32],
        what: &str,
    ) -> Result<()>;
    /// `x Wᵀ + b` for `W: [out, in]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight, b: Option<&Self::Weight>) -> Self::Tensor;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// The same row-major values viewed as rows of `cols` features, without a copy: a
    /// `[tokens, heads·hd]` activation becomes `[tokens·heads, hd]` for a per-head norm and back.
    /// `cols` must divide the number of values.
    fn reshape(&self, x: Self::Tensor, cols: usize) -> Self::Tensor;
    /// `x / sqrt(mean(x²) + eps) · w` per token (Llama's RMSNorm, computed in f32).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor;
    /// `(x - mean) / sqrt(var + eps) · w + b` per token (biased variance, as `nn.LayerNorm`).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor;
    /// `layer_norm(x + y)`, reusing `x`'s storage where the backend can (a residual connection
    /// followed by BERT's post-LayerNorm).
    fn add_layer_norm(
        &self,
        mut x: Self::Tensor,
        y: &Self::Tensor,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Self::Tensor {
        self.add(&mut x, y);
        self.layer_norm(&x, w, b, eps)
    }
    /// The rotary tables (cos and sin, `[tokens, half]` each, [`Rope::tables`]) where the
    /// backend reads them: made once per forward pass, since every layer's q and k use the same
    /// (a GPU uploads them once instead of twice per layer).
    fn rope_tables(&self, cos: Array2<f32>, sin: Array2<f32>) -> Self::RopeTables;
    /// Rotates every head of `x` (`[tokens, heads·head_dim]`) by the tables of its token
    /// (`[tokens, half]`): the first `2·half` features of each head (all of them when `half` is
    /// `head_dim / 2`; fewer is Phi-3's partial rotary, the rest passing through).
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, tables: &Self::RopeTables);
    /// `softmax(softcap(q kᵀ · scale) + mask) v` per sequence and head (see [`Heads`]); `q: [tokens, heads·hd]`,
    /// `k`, `v`: `[tokens, kv_heads·hd]`; returns `[tokens, heads·hd]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: Heads,
        segments: &Segments,
        mask: AttentionMask,
    ) -> Self::Tensor;
    /// `x = act(x)` element-wise.
    fn activate(&self, x: &mut Self::Tensor, act: Activation);
    /// `act(gate) ⊙ up`.
    fn gated(&self, gate: &Self::Tensor, up: &Self::Tensor, act: Activation) -> Self::Tensor;
    /// Copies the token rows `keep` (in order) to host memory.
    fn rows(&self, x: &Self::Tensor, keep: &[usize]) -> Array2<f32>;
    /// The activation as a host matrix without copying, where it already is one (the CPU).
    fn host_view<'a>(&self, x: &'a Self::Tensor) -> Option<ArrayView2<'a, f32>>;
    /// Feature dimension of an activation.
    fn dim(&self, x: &Self::Tensor) -> usize;
    /// Token rows of an activation.
    fn tokens(&self, x: &Self::Tensor) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 `head_dim^-0.5` rounded once, as PyTorch receives transformers' Python float:
    /// the f32 `1 / sqrt` is 1 ulp low at Phi-3's head_dim 96 (values from NumPy).
    #[test]
    fn the_default_scale_is_transformers_python_float_in_f32() {
        assert_eq!(Heads::default_scale(96), 0.10206208);
        assert_eq!(1.0 / 96f32.sqrt(), 0.10206207);
        assert_eq!(Heads::default_scale(112), 0.09449112);
        assert_eq!(Heads::default_scale(128), 0.088388346);
        assert_eq!(Heads::default_scale(64), 0.125);
    }

    #[test]
    fn exp_is_accurate_to_f32() {
        let mut worst = 0.0f64;
        for i in -8730..=8800 {
            let x = i as f32 / 100.0 + 0.003;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(88.7).is_finite());
    }

    #[test]
    fn erf_is_accurate_to_f32() {
        for i in -400..=400 {
            let x = i as f64 / 100.0;
            let e = (erf(x as f32) as f64 - libm::erf(x)).abs();
            // The formula's 1.5e-7 plus f32 rounding of its few operations.
            assert!(e < 3e-7, "erf({x}): error {e}");
        }
    }

    #[test]
    fn activations_match_closed_forms() {
        assert!((Activation::Gelu.apply(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((Activation::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(Activation::Relu.apply(-2.0), 0.0);
    }
}
