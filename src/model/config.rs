//! `config.json` of a HuggingFace model, read into the few numbers the forward passes need,
//! including the variants seen in the wild (transformers 4 and 5 RoPE keys, per-layer-type RoPE,
//! `head_dim`, GQA, biases, sliding windows and `layer_types`, q/k norms, Gemma's norms and
//! scales, Phi-3's fused projections and partial rotary, multimodal `text_config`s, RoBERTa's
//! position offset).

use crate::device::backend::{Activation, Heads, Rope};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The `model_type` values eva runs.
pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "gemma3",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "bert",
    "roberta",
];

/// A supported architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 3's text model (`Gemma3ForCausalLM`).
    Gemma3Text,
    /// Gemma 3's multimodal model: only its text tower (`text_config`, keys
    /// `model.language_model.*`) runs.
    Gemma3,
    /// Phi-3 and Phi-4 (fused `qkv_proj` and `gate_up_proj`).
    Phi3,
    Mixtral,
    Qwen2Moe,
    /// Qwen3's attention (q/k norms) with Qwen2-MoE's sparse blocks, without a shared expert.
    Qwen3Moe,
    Bert,
    Roberta,
}

impl Arch {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3Text => "gemma3_text",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
        }
    }

    /// Whether this is a causal decoder (Llama family) rather than a bidirectional encoder.
    pub fn is_decoder(self) -> bool {
        !matches!(self, Arch::Bert | Arch::Roberta)
    }
}

/// Decoder settings (llama, mistral, qwen2, qwen3, gemma3, phi3): a Llama-style block with the
/// variants below.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub act: Activation,
    /// RoPE of the full-attention layers (of every layer without `local_rope`).
    pub rope: Rope,
    /// RoPE of the sliding-window layers where it differs (Gemma 3's local base frequency).
    pub local_rope: Option<Rope>,
    /// A human-readable RoPE description for `eva inspect`.
    pub rope_desc: String,
    /// Bias on q/k/v, on o, and on gate/up/down.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Sliding window per layer (`None` = full causal attention).
    pub windows: Vec<Option<usize>>,
    /// Whether each layer is a `sliding_attention` layer (selects `local_rope`).
    pub sliding: Vec<bool>,
    /// Per-head RMSNorm of queries and keys before RoPE (`self_attn.q_norm` / `k_norm`: Qwen3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// Gemma's RMSNorm `x · (1 + w)`: every norm weight is loaded as `1 + w` (in f32, as
    /// transformers computes it), so the plain RMSNorm op applies it.
    pub norm_offset: bool,
    /// Gemma 3's four norms per block: `post_attention_layernorm` on the attention output
    /// before the residual add, `pre_feedforward_layernorm` into the MLP and
    /// `post_feedforward_layernorm` on its output (else `post_attention_layernorm` feeds the MLP).
    pub sandwich: bool,
    /// Phi-3's fused `self_attn.qkv_proj` (q, k, v rows) and `mlp.gate_up_proj` (gate, up rows).
    pub fused: bool,
    /// Factor of the token embeddings (Gemma: `sqrt(hidden)` rounded to f32).
    pub embed_scale: Option<f32>,
    /// The attention scores' factor (`head_dim^-0.5`; Gemma 3 `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f32,
    /// Attention logit soft-capping (none of the supported families applies it: Gemma 3's
    /// attention ignores its config's `attn_logit_softcapping`).
    pub softcap: Option<f32>,
    /// Mixture-of-experts settings (mixtral, qwen2_moe, qwen3_moe); `None` for dense decoders.
    pub moe: Option<Box<MoeConfig>>,
}

/// How a sparse block's experts are named in the checkpoint: transformers 5 fuses them into
/// `mlp.experts.gate_up_proj` `[E, 2f, h]` and `mlp.experts.down_proj` `[E, h, f]`; checkpoints as
/// `save_pretrained` writes them (and as they ship) hold one key per expert instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKeys {
    /// `mlp.experts.N.{gate,up,down}_proj.weight` (Qwen-MoE).
    Qwen,
    /// `block_sparse_moe.experts.N.{w1,w3,w2}.weight` and `block_sparse_moe.gate.weight` (Mixtral).
    Mixtral,
}

/// A mixture-of-experts MLP (transformers' `*SparseMoeBlock`): a router (`mlp.gate`, softmax in
/// f32, top-k, optionally renormalized), `experts` SwiGLU experts of width `intermediate`, and
/// for Qwen2-MoE a shared expert scaled by `sigmoid(shared_expert_gate(x))`.
#[derive(Clone, Debug)]
pub struct MoeConfig {
    /// Routed experts (`num_experts`, Mixtral's `num_local_experts`).
    pub experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each routed expert's width (`moe_intermediate_size`; Mixtral's `intermediate_size`).
    pub intermediate: usize,
    /// Divide the top-k probabilities by their sum (`norm_topk_prob`; always for Mixtral).
    pub norm_topk: bool,
    /// The shared expert's width (`shared_expert_intermediate_size`, Qwen2-MoE).
    pub shared: Option<usize>,
    /// Per block: whether its MLP is sparse (not in `mlp_only_layers`, and
    /// `(layer + 1) % decoder_sparse_step == 0`); dense blocks use `intermediate_size`.
    pub sparse: Vec<bool>,
    /// Per-expert key naming on disk.
    pub keys: ExpertKeys,
    /// Whether a dense block's MLP (`mlp.gate_proj`, `up_proj`, `down_proj`) is a target.
    /// Not for Qwen3-MoE: PEFT 0.21 rewrites those module names of a Qwen3-MoE model into the
    /// experts' parameters (its transformers 4 → 5 conversion, `_convert_peft_config_moe`), so an
    /// adapter targeting them would not load as written.
    pub dense_targets: bool,
}

/// BERT-family settings (bert, roberta).
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f32,
    pub act: Activation,
    pub max_positions: usize,
    pub type_vocab: usize,
    /// RoBERTa: positions start at `pad + 1` and padding has position `pad`.
    pub position_offset: Option<u32>,
}

/// The parsed configuration.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    /// `architectures[0]`, e.g. `LlamaForCausalLM` (empty if absent).
    pub class: String,
    pub vocab: usize,
    /// `pad_token_id`, if set.
    pub pad_token_id: Option<u32>,
    pub family: Family,
}

/// Per-family settings.
#[derive(Clone, Debug)]
pub enum Family {
    /// Boxed: the decoder settings are the larger by far.
    Decoder(Box<DecoderConfig>),
    Encoder(EncoderConfig),
}

impl ModelConfig {
    /// The PEFT `task_type` written for the checkpoint's class: `CAUSAL_LM` for `*ForCausalLM`,
    /// `FEATURE_EXTRACTION` for bare `*Model`s, and none otherwise. PEFT's `SEQ_CLS`,
    /// `TOKEN_CLS` and `QUESTION_ANS` models add the task head to `modules_to_save` and then
    /// refuse to load an adapter file without the head's weights (peft 0.21,
    /// `set_peft_model_state_dict`: KeyError `base_model.model.classifier.weight`); eva writes
    /// LoRA tensors only, so for those classes it leaves `task_type` null, which loads
    /// (`--task-type` overrides).
    pub fn task_type(&self) -> Option<&'static str> {
        let c = self.class.as_str();
        if c.ends_with("ForCausalLM") {
            Some("CAUSAL_LM")
        } else if c.ends_with("Model") {
            Some("FEATURE_EXTRACTION")
        } else {
            None
        }
    }

    /// The longest sequence the model's positions allow (`None` = no learned limit).
    pub fn max_positions(&self) -> Option<usize> {
        match &self.family {
            Family::Decoder(_) => None,
            Family::Encoder(e) => {
                Some(e.max_positions - e.position_offset.map_or(0, |p| p as usize + 1))
            }
        }
    }
}

/// Reads `field` of a config object, with messages that name the file and the key.
struct Reader<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, want: &str) -> Error {
        Error::data(format!(
            "{}: `{key}` must be {want}, found {}",
            self.path.display(),
            self.v
                .get(key)
                .map_or("nothing".to_string(), |v| v.to_string())
        ))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.v.get(key).and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(self.err(key, "a positive integer")),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| self.err(key, "a non-negative number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false")),
        }
    }

    fn act_key(&self, key: &str, default: &str) -> Result<Activation> {
        let name = match self.v.get(key) {
            None | Some(Value::Null) => default,
            Some(v) => v.as_str().ok_or_else(|| self.err(key, "a string"))?,
        };
        Activation::parse(name).ok_or_else(|| {
            Error::data(format!(
                "{}: {key} `{name}` is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu)",
                self.path.display()
            ))
        })
    }
}

/// Parses `config.json` in `dir`.
pub fn load(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let bytes =
        std::fs::read(&path).map_err(|e| Error::io("cannot read model config", &path, e))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::data(format!("{}: not valid JSON: {e}", path.display())))?;
    parse(&v, &path)
}

/// Parses a config object (`path` is only used in messages).
pub fn parse(v: &Value, path: &Path) -> Result<ModelConfig> {
    if !v.is_object() {
        return Err(Error::data(format!(
            "{}: expected a JSON object",
            path.display()
        )));
    }
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3_text" => Arch::Gemma3Text,
        "gemma3" => Arch::Gemma3,
        "phi3" => Arch::Phi3,
        "mixtral" => Arch::Mixtral,
        "qwen2_moe" => Arch::Qwen2Moe,
        "qwen3_moe" => Arch::Qwen3Moe,
        "bert" => Arch::Bert,
        "roberta" => Arch::Roberta,
        other => {
            return Err(Error::data(format!(
                "{}: model_type `{other}` is not supported (supported: {})",
                path.display(),
                SUPPORTED.join(", ")
            )))
        }
    };
    let class = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    // A multimodal Gemma 3 keeps its language model's settings in `text_config`.
    let text = match arch {
        Arch::Gemma3 => v
            .get("text_config")
            .filter(|t| t.is_object())
            .ok_or_else(|| {
                Error::data(format!(
                    "{}: model_type `gemma3` needs a `text_config` object (the text tower eva runs)",
                    path.display()
                ))
            })?,
        _ => v,
    };
    let r = Reader { v: text, path };
    let vocab = r.usize("vocab_size")?;
    let pad_token_id = text
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|p| p as u32);
    let family = if arch.is_decoder() {
        decoder(&r, arch)?.into()
    } else {
        encoder(&r, arch, pad_token_id)?.into()
    };
    Ok(ModelConfig {
        arch,
        class,
        vocab,
        pad_token_id,
        family,
    })
}

/// The decoder settings of `arch` (defaults as transformers' config classes have them).
fn decoder(r: &Reader, arch: Arch) -> Result<DecoderConfig> {
    let path = r.path;
    let hidden = r.usize("hidden_size")?;
    let intermediate = r.usize("intermediate_size")?;
    let layers = r.usize("num_hidden_layers")?;
    let heads = r.usize("num_attention_heads")?;
    let kv_heads = r.usize_or("num_key_value_heads", heads)?;
    if heads % kv_heads != 0 {
        return Err(Error::data(format!(
            "{}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}",
            path.display()
        )));
    }
    let gemma = matches!(arch, Arch::Gemma3 | Arch::Gemma3Text);
    // Qwen3Config and Gemma3TextConfig default head_dim to 128 and 256, the others derive it.
    let head_dim = match arch {
        Arch::Qwen3 => r.usize_or("head_dim", 128)?,
        _ if gemma => r.usize_or("head_dim", 256)?,
        _ => {
            if hidden % heads != 0 && r.v.get("head_dim").is_none_or(Value::is_null) {
                return Err(Error::data(format!(
                    "{}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} and no head_dim is given",
                    path.display()
                )));
            }
            r.usize_or("head_dim", hidden / heads)?
        }
    };
    if head_dim % 2 != 0 {
        return Err(Error::data(format!(
            "{}: head_dim = {head_dim} must be even for rotary embeddings",
            path.display()
        )));
    }
    if gemma && r.bool_or("use_bidirectional_attention", false)? {
        return Err(Error::data(format!(
            "{}: use_bidirectional_attention = true (an embedding Gemma) is not supported: eva runs Gemma 3 as a causal decoder",
            path.display()
        )));
    }
    let (sliding, windows) = layer_types(r, arch, layers)?;
    let (rope, local_rope, rope_desc) = if gemma {
        gemma_ropes(r, head_dim)?
    } else {
        let (rope, desc) = rope(r, head_dim, arch == Arch::Phi3)?;
        (rope, None, desc)
    };
    let (qkv_bias, o_bias, mlp_bias) = match arch {
        Arch::Llama => {
            let a = r.bool_or("attention_bias", false)?;
            (a, a, r.bool_or("mlp_bias", false)?)
        }
        // Qwen2Attention: q/k/v with bias, o_proj without (transformers' modeling_qwen2.py).
        Arch::Qwen2 => (true, false, false),
        // Qwen2MoeAttention: q/k/v bias from `qkv_bias` (default true), o_proj without.
        Arch::Qwen2Moe => (r.bool_or("qkv_bias", true)?, false, false),
        // Qwen3Attention, Qwen3MoeAttention and Gemma3Attention: `attention_bias` on q, k, v, o.
        Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 | Arch::Gemma3Text => {
            let a = r.bool_or("attention_bias", false)?;
            (a, a, false)
        }
        _ => (false, false, false),
    };
    let (act, attn_scale) = if gemma {
        // Gemma3TextConfig: `hidden_activation`, and scores scaled by query_pre_attn_scalar^-0.5
        // (a Python float, applied to the f32 scores as f32).
        let act = r.act_key("hidden_activation", "gelu_pytorch_tanh")?;
        let q = r.f64_or("query_pre_attn_scalar", 256.0)?;
        if q <= 0.0 {
            return Err(r.err("query_pre_attn_scalar", "a positive number"));
        }
        (act, q.powf(-0.5) as f32)
    } else {
        (
            r.act_key("hidden_act", "silu")?,
            Heads::default_scale(head_dim),
        )
    };
    // Gemma3TextConfig has `attn_logit_softcapping`, but transformers' Gemma3Attention does not
    // pass it to the attention (modeling_gemma3.py, 5.x): Gemma 3's scores are not soft-capped,
    // whatever the config says (the gemma3_text fixture sets it to 5 and PyTorch ignores it).
    // `Heads::softcap` stays for a family whose attention applies it.
    let softcap = None;
    Ok(DecoderConfig {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        eps: r.f64_or("rms_norm_eps", if arch == Arch::Phi3 { 1e-5 } else { 1e-6 })? as f32,
        act,
        rope,
        local_rope,
        rope_desc,
        qkv_bias,
        o_bias,
        mlp_bias,
        windows,
        sliding,
        qk_norm: matches!(
            arch,
            Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 | Arch::Gemma3Text
        ),
        norm_offset: gemma,
        sandwich: gemma,
        fused: arch == Arch::Phi3,
        // Gemma3TextScaledWordEmbedding: `torch.tensor(hidden_size ** 0.5)`, an f32 scalar (the
        // embedding's dtype when PyTorch computes in f32, as eva does).
        embed_scale: gemma.then(|| (hidden as f64).sqrt() as f32),
        attn_scale,
        softcap,
        moe: moe(r, arch, layers)?,
    })
}

/// The mixture-of-experts settings of `arch` (`None` for dense decoders), with transformers'
/// defaults for keys a config leaves out.
fn moe(r: &Reader, arch: Arch, layers: usize) -> Result<Option<Box<MoeConfig>>> {
    // Transformers 5 writes `num_experts` under its attribute-map name `num_local_experts` for
    // some families (Qwen3-MoE); checkpoints as they ship use `num_experts`. Either is read.
    let count = |default: usize| -> Result<usize> {
        match r.v.get("num_experts") {
            None | Some(Value::Null) => r.usize_or("num_local_experts", default),
            Some(_) => r.usize("num_experts"),
        }
    };
    let (experts, intermediate, norm_topk, shared, keys, default_k) = match arch {
        Arch::Mixtral => (
            count(8)?,
            r.usize("intermediate_size")?,
            true,
            None,
            ExpertKeys::Mixtral,
            2,
        ),
        Arch::Qwen2Moe => (
            count(60)?,
            r.usize_or("moe_intermediate_size", 1408)?,
            r.bool_or("norm_topk_prob", false)?,
            Some(r.usize_or("shared_expert_intermediate_size", 5632)?),
            ExpertKeys::Qwen,
            4,
        ),
        Arch::Qwen3Moe => (
            count(128)?,
            r.usize_or("moe_intermediate_size", 768)?,
            r.bool_or("norm_topk_prob", false)?,
            None,
            ExpertKeys::Qwen,
            8,
        ),
        _ => return Ok(None),
    };
    let top_k = r.usize_or("num_experts_per_tok", default_k)?;
    if top_k > experts {
        return Err(Error::data(format!(
            "{}: num_experts_per_tok = {top_k} is more than the {experts} experts",
            r.path.display()
        )));
    }
    let step = match arch {
        Arch::Mixtral => 1,
        _ => r.usize_or("decoder_sparse_step", 1)?,
    };
    let dense: Vec<u64> = match r.v.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| r.err("mlp_only_layers", "a list of block numbers"))?,
    };
    let sparse = (0..layers)
        .map(|l| !dense.contains(&(l as u64)) && (l + 1) % step == 0)
        .collect();
    Ok(Some(Box::new(MoeConfig {
        experts,
        top_k,
        intermediate,
        norm_topk,
        shared,
        sparse,
        keys,
        dense_targets: arch != Arch::Qwen3Moe,
    })))
}

/// The encoder settings of `arch` (bert, roberta).
fn encoder(r: &Reader, arch: Arch, pad_token_id: Option<u32>) -> Result<EncoderConfig> {
    let path = r.path;
    let hidden = r.usize("hidden_size")?;
    let heads = r.usize("num_attention_heads")?;
    let pet =
        r.v.get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute");
    if pet != "absolute" {
        return Err(Error::data(format!(
            "{}: position_embedding_type `{pet}` is not supported (only `absolute`)",
            path.display()
        )));
    }
    if hidden % heads != 0 {
        return Err(Error::data(format!(
            "{}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}",
            path.display()
        )));
    }
    let position_offset = match arch {
        // RobertaEmbeddings: position ids start at padding_idx + 1.
        Arch::Roberta => Some(pad_token_id.unwrap_or(1)),
        _ => None,
    };
    let max_positions = r.usize("max_position_embeddings")?;
    if position_offset.is_some_and(|p| p as usize + 1 >= max_positions) {
        return Err(Error::data(format!(
            "{}: max_position_embeddings = {max_positions} leaves no positions after the padding offset {}",
            path.display(),
            position_offset.unwrap_or(0) + 1
        )));
    }
    Ok(EncoderConfig {
        hidden,
        intermediate: r.usize("intermediate_size")?,
        layers: r.usize("num_hidden_layers")?,
        heads,
        eps: r.f64_or("layer_norm_eps", 1e-12)? as f32,
        act: r.act_key("hidden_act", "gelu")?,
        max_positions,
        type_vocab: r.usize_or("type_vocab_size", 2)?,
        position_offset,
    })
}

impl From<DecoderConfig> for Family {
    fn from(c: DecoderConfig) -> Self {
        Family::Decoder(Box::new(c))
    }
}

impl From<EncoderConfig> for Family {
    fn from(c: EncoderConfig) -> Self {
        Family::Encoder(c)
    }
}

/// RoPE of a llama-style config. `rope_theta` sits at top level (transformers 4) or inside
/// `rope_parameters` (transformers 5); scaling comes from `rope_parameters.rope_type` or
/// `rope_scaling.{rope_type,type}`. `partial` allows `partial_rotary_factor` (Phi-3, whose
/// attention rotates only the first `head_dim · factor` features of each head).
fn rope(r: &Reader, head_dim: usize, partial: bool) -> Result<(Rope, String)> {
    let params = r.v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = r.v.get("rope_scaling").filter(|p| p.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| r.v.get("rope_theta"));
    let spec = params.or(scaling);
    let factor = spec
        .and_then(|s| s.get("partial_rotary_factor"))
        .or_else(|| r.v.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let dim = if factor == 1.0 {
        head_dim
    } else if partial && factor > 0.0 && factor < 1.0 {
        // `int(head_dim * partial_rotary_factor)`, as transformers computes the rotary width.
        let dim = (head_dim as f64 * factor) as usize;
        if dim == 0 || dim % 2 != 0 {
            return Err(Error::data(format!(
                "{}: partial_rotary_factor = {factor} gives {dim} rotary features of head_dim {head_dim}; an even, positive number is needed",
                r.path.display()
            )));
        }
        dim
    } else {
        return Err(Error::data(format!(
            "{}: partial_rotary_factor = {factor} is not supported{}",
            r.path.display(),
            if partial {
                " (expected a number in (0, 1])"
            } else {
                " for this model_type (only 1)"
            }
        )));
    };
    let (rope, desc) = rope_from(r, spec, theta, 10000.0, dim)?;
    let desc = if dim == head_dim {
        desc
    } else {
        format!("{desc}, {dim} of {head_dim} features rotated")
    };
    Ok((rope, desc))
}

/// Gemma 3's two RoPEs: transformers 5's `rope_parameters` per layer type
/// (`full_attention`, `sliding_attention`), or the older `rope_theta` (global, default 1e6)
/// with `rope_scaling`, and `rope_local_base_freq` (sliding layers, default 1e4, no scaling).
fn gemma_ropes(r: &Reader, head_dim: usize) -> Result<(Rope, Option<Rope>, String)> {
    let params = r.v.get("rope_parameters").filter(|p| p.is_object());
    let per_type = params
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let (global, local) = match per_type {
        Some(p) => {
            let full = p.get("full_attention").filter(|s| s.is_object());
            let slide = p.get("sliding_attention").filter(|s| s.is_object());
            (
                rope_from(
                    r,
                    full,
                    full.and_then(|s| s.get("rope_theta")),
                    1e6,
                    head_dim,
                )?,
                rope_from(
                    r,
                    slide,
                    slide.and_then(|s| s.get("rope_theta")),
                    1e4,
                    head_dim,
                )?,
            )
        }
        None => {
            let spec = params.or_else(|| r.v.get("rope_scaling").filter(|s| s.is_object()));
            let theta = params
                .and_then(|p| p.get("rope_theta"))
                .or_else(|| r.v.get("rope_theta"));
            (
                rope_from(r, spec, theta, 1e6, head_dim)?,
                rope_from(r, None, r.v.get("rope_local_base_freq"), 1e4, head_dim)?,
            )
        }
    };
    let desc = format!("global {}; sliding {}", global.1, local.1);
    Ok((global.0, Some(local.0), desc))
}

/// Inverse frequencies for `dim` rotary features from a RoPE spec (`rope_type` or `type` and
/// its parameters; none = default) and `rope_theta` (`default_theta` if absent). Formulas:
/// transformers' `modeling_rope_utils.py`.
fn rope_from(
    r: &Reader,
    spec: Option<&Value>,
    theta: Option<&Value>,
    default_theta: f64,
    dim: usize,
) -> Result<(Rope, String)> {
    let theta = rope_theta(r, theta, default_theta)?;
    let kind = spec
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        spec.and_then(|s| s.get(key))
            .and_then(Value::as_f64)
            .ok_or_else(|| {
                Error::data(format!(
                    "{}: rope type `{kind}` needs a numeric `{key}`",
                    r.path.display()
                ))
            })
    };
    let base = default_inv_freq(theta, dim);
    let (inv, desc): (Vec<f64>, String) = match kind {
        "default" => (base, format!("theta {theta}")),
        "linear" => {
            let factor = num("factor")?;
            (
                base.iter().map(|f| f / factor).collect(),
                format!("theta {theta}, linear x{factor}"),
            )
        }
        "llama3" => {
            let factor = num("factor")?;
            let inv = llama3_inv_freq(
                &base,
                factor,
                (num("low_freq_factor")?, num("high_freq_factor")?),
                num("original_max_position_embeddings")?,
            );
            (inv, format!("theta {theta}, llama3 x{factor}"))
        }
        "longrope" | "su" => return longrope(r, spec, theta, dim),
        "yarn" if r.v.get("model_type").and_then(Value::as_str) == Some("phi3") => {
            // Phi3Config renames `su` and `yarn` to `longrope`.
            return longrope(r, spec, theta, dim);
        }
        other => {
            return Err(Error::data(format!(
                "{}: rope type `{other}` is not supported (supported: default, linear, llama3, longrope)",
                r.path.display()
            )))
        }
    };
    Ok((Rope::new(inv.into_iter().map(|f| f as f32).collect()), desc))
}

/// `rope_theta` where the config gives one (null: absent), else `default`.
fn rope_theta(r: &Reader, theta: Option<&Value>, default: f64) -> Result<f64> {
    Ok(theta
        .filter(|t| !t.is_null())
        .map(|t| {
            t.as_f64()
                .filter(|t| *t > 0.0)
                .ok_or_else(|| r.err("rope_theta", "a positive number"))
        })
        .transpose()?
        .unwrap_or(default))
}

/// `inv_freq[i] = theta^(-2i/dim)`, as transformers computes it: exponent and power in f32.
fn default_inv_freq(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0 / (theta as f32).powf(e) as f64
        })
        .collect()
}

/// Llama 3's scaling of `base` frequencies: wavelengths above `original / low` divided by
/// `factor`, below `original / high` kept, and a smooth blend between.
fn llama3_inv_freq(base: &[f64], factor: f64, (low, high): (f64, f64), original: f64) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    base.iter()
        .map(|&f| {
            let f = f as f32 as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                scaled
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            }
        })
        .collect()
}

/// LongRoPE (Phi-3's long-context RoPE), as transformers' `_compute_longrope_parameters`:
/// `inv_freq = 1 / (ext · theta^(2i/d))` in f32 with `ext` the `short_factor` list, or the
/// `long_factor` list for a batch longer than `original_max_position_embeddings`; cos and sin
/// times `attention_factor` (default `sqrt(1 + ln(factor) / ln(original))` with `factor =
/// max_position_embeddings / original` unless given, 1 when `factor ≤ 1`).
fn longrope(r: &Reader, spec: Option<&Value>, theta: f64, dim: usize) -> Result<(Rope, String)> {
    let path = r.path.display();
    let get = |key: &str| spec.and_then(|s| s.get(key)).filter(|v| !v.is_null());
    let list = |key: &str| -> Result<Vec<f32>> {
        let v = get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| {
                Error::data(format!(
                    "{path}: rope type `longrope` needs `{key}`, a list of {} numbers",
                    dim / 2
                ))
            })?;
        if v.len() != dim / 2 {
            return Err(Error::data(format!(
                "{path}: rope `{key}` has {} numbers, expected {} (rotary dims / 2)",
                v.len(),
                dim / 2
            )));
        }
        Ok(v.into_iter().map(|f| f as f32).collect())
    };
    let (short, long) = (list("short_factor")?, list("long_factor")?);
    let original = get("original_max_position_embeddings")
        .or_else(|| r.v.get("original_max_position_embeddings"))
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::data(format!(
                "{path}: rope type `longrope` needs a positive `original_max_position_embeddings`"
            ))
        })? as usize;
    let factor = match get("factor").and_then(Value::as_f64) {
        Some(f) => f,
        None => r.usize("max_position_embeddings")? as f64 / original as f64,
    };
    let attention = match get("attention_factor").and_then(Value::as_f64) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    // `base ** (arange(0, dim, 2) / dim)` in f32, times the factors, inverted, all in f32.
    let freqs = |ext: &[f32]| -> Vec<f32> {
        ext.iter()
            .enumerate()
            .map(|(i, &e)| 1.0 / (e * (theta as f32).powf((2 * i) as f32 / dim as f32)))
            .collect()
    };
    Ok((
        Rope {
            inv_freq: freqs(&short),
            scaling: attention as f32,
            long: Some((freqs(&long), original)),
        },
        format!("theta {theta}, longrope (original {original} positions, cos/sin x{attention:.6})"),
    ))
}

/// Which layers are `sliding_attention` layers, and the sliding window of each layer. An
/// explicit `layer_types` list wins; else Mistral's `sliding_window` on every layer, Phi-3's
/// too, Qwen2's and Qwen3's only with `use_sliding_window`, from layer `max_window_layers` on,
/// and Gemma 3's on every layer but each `sliding_window_pattern`-th (default 6). A window the
/// model does not use is not read (transformers ignores it too).
///
/// `sliding_window: 0` is refused where it is used. transformers 5.24's mask for it
/// (`masking_utils.sliding_window_overlay`, `kv_idx > q_idx - 0`, with causality
/// `kv_idx <= q_idx`) keeps no key at all, and what the model then computes is an accident of
/// the attention implementation: eager attention adds `finfo.min` everywhere and so averages
/// every key of the sequence, future ones included; SDPA gives yet other values; a cache fails on
/// a shape mismatch. There is no model to match; both of eva's backends give a window of 0 the
/// mask's meaning (no key, output 0) if asked directly.
fn layer_types(r: &Reader, arch: Arch, layers: usize) -> Result<(Vec<bool>, Vec<Option<usize>>)> {
    let used = match arch {
        Arch::Mistral | Arch::Phi3 | Arch::Mixtral | Arch::Gemma3 | Arch::Gemma3Text => true,
        _ if is_qwen(arch) => r.bool_or("use_sliding_window", false)?,
        _ => false,
    };
    let window = if used { sliding_window(r, arch)? } else { None };
    let sliding = sliding_layers(r, arch, layers)?;
    let windows = sliding
        .iter()
        .map(|&s| if s { window } else { None })
        .collect();
    Ok((sliding, windows))
}

/// The Qwen families (`use_sliding_window`, `max_window_layers`).
fn is_qwen(arch: Arch) -> bool {
    matches!(
        arch,
        Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe
    )
}

/// The `sliding_window` of a model that uses one (transformers' default where absent), refusing 0.
fn sliding_window(r: &Reader, arch: Arch) -> Result<Option<usize>> {
    match r.v.get("sliding_window") {
        None | Some(Value::Null) => Ok(match arch {
            // Qwen3Config and Gemma3TextConfig default sliding_window to 4096.
            Arch::Qwen3 | Arch::Gemma3 | Arch::Gemma3Text => Some(4096),
            _ => None,
        }),
        Some(v) if v.as_u64() == Some(0) => Err(Error::data(format!(
            "{}: `sliding_window` 0 keeps no key at all (transformers' mask \
             `kv_idx > q_idx - sliding_window` with `kv_idx <= q_idx`), and transformers' eager \
             and SDPA attention then disagree (eager averages every key, future ones \
             included): set a positive window, or null for full causal attention",
            r.path.display()
        ))),
        Some(_) => Ok(Some(r.usize("sliding_window")?)),
    }
}

/// Which of the `layers` blocks are `sliding_attention` ones: the explicit `layer_types` list,
/// else the family's default.
fn sliding_layers(r: &Reader, arch: Arch, layers: usize) -> Result<Vec<bool>> {
    if let Some(types) = r.v.get("layer_types").and_then(Value::as_array) {
        if types.len() != layers {
            return Err(Error::data(format!(
                "{}: layer_types has {} entries for {layers} layers",
                r.path.display(),
                types.len()
            )));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(false),
                Some("sliding_attention") => Ok(true),
                _ => Err(Error::data(format!(
                    "{}: layer_types entry {t} is not supported (expected full_attention or sliding_attention)",
                    r.path.display()
                ))),
            })
            .collect();
    }
    Ok(match arch {
        Arch::Gemma3 | Arch::Gemma3Text => {
            let pattern = r.usize_or("sliding_window_pattern", 6)?;
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
        // Qwen2MoeConfig's default layer_types: sliding on even blocks below max_window_layers.
        Arch::Qwen2Moe => {
            let below = r.usize_or("max_window_layers", 28)?;
            (0..layers).map(|i| i % 2 == 0 && i < below).collect()
        }
        // Qwen3MoeAttention: the window (with use_sliding_window) on every layer.
        Arch::Qwen3Moe => vec![true; layers],
        // Qwen2Config's and Qwen3Config's default max_window_layers is 28.
        _ if is_qwen(arch) => {
            let first =
                r.v.get("max_window_layers")
                    .and_then(Value::as_u64)
                    .unwrap_or(28) as usize;
            (0..layers).map(|i| i >= first).collect()
        }
        _ => vec![true; layers],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<ModelConfig> {
        parse(&v, Path::new("config.json"))
    }

    #[test]
    fn rope_theta_top_level_or_nested_is_the_same() {
        let base = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2});
        let mut a = base.clone();
        a["rope_theta"] = json!(500000.0);
        let mut b = base.clone();
        b["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        let (Family::Decoder(a), Family::Decoder(b)) =
            (cfg(a).unwrap().family, cfg(b).unwrap().family)
        else {
            panic!()
        };
        assert_eq!(a.rope.inv_freq, b.rope.inv_freq);
        assert_eq!(a.rope.inv_freq[0], 1.0);
        assert!((a.rope.inv_freq[1] - 500000f32.powf(-0.5)).abs() < 1e-9);
    }

    fn decoder_windows(v: Value) -> Result<Vec<Option<usize>>> {
        let mut base = json!({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 3, "num_attention_heads": 2});
        for (k, x) in v.as_object().expect("an object") {
            base[k] = x.clone();
        }
        match cfg(base)?.family {
            Family::Decoder(d) => Ok(d.windows),
            Family::Encoder(_) => panic!("a decoder"),
        }
    }

    /// Mistral's window applies to every layer, Qwen2's only with `use_sliding_window` and from
    /// `max_window_layers` on, `layer_types` wins; a window of 0 is refused where it is used and
    /// ignored where transformers ignores it (Llama, Qwen2 without `use_sliding_window`).
    #[test]
    fn sliding_windows_per_layer_and_a_window_of_zero() {
        let w = |v| decoder_windows(v).unwrap();
        assert_eq!(
            w(json!({"model_type": "mistral", "sliding_window": 4})),
            vec![Some(4); 3]
        );
        assert_eq!(
            w(json!({"model_type": "mistral", "sliding_window": null})),
            vec![None; 3]
        );
        assert_eq!(
            w(
                json!({"model_type": "qwen2", "sliding_window": 4, "use_sliding_window": true, "max_window_layers": 1})
            ),
            vec![None, Some(4), Some(4)]
        );
        assert_eq!(
            w(
                json!({"model_type": "qwen2", "sliding_window": 4, "use_sliding_window": true,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
            ),
            vec![Some(4), None, Some(4)]
        );
        for unused in [
            json!({"model_type": "llama", "sliding_window": 0}),
            json!({"model_type": "qwen2", "sliding_window": 0, "use_sliding_window": false}),
        ] {
            assert_eq!(w(unused), vec![None; 3]);
        }
        for used in [
            json!({"model_type": "mistral", "sliding_window": 0}),
            json!({"model_type": "qwen2", "sliding_window": 0, "use_sliding_window": true}),
        ] {
            let e = decoder_windows(used).unwrap_err().to_string();
            assert!(
                e.contains("config.json") && e.contains("`sliding_window` 0 keeps no key"),
                "{e}"
            );
        }
        let e = decoder_windows(json!({"model_type": "mistral", "sliding_window": -3}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a positive integer, found -3"), "{e}");
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let e = cfg(json!({"model_type": "gpt2"})).unwrap_err().to_string();
        assert!(
            e.contains("gpt2")
                && e.contains("llama, mistral, qwen2")
                && e.contains("qwen3_moe, bert, roberta"),
            "{e}"
        );
    }

    fn decoder_of(v: Value) -> DecoderConfig {
        match cfg(v).unwrap().family {
            Family::Decoder(d) => *d,
            Family::Encoder(_) => panic!("a decoder"),
        }
    }

    /// Gemma 3's older config keys (`rope_theta`, `rope_local_base_freq`, `rope_scaling` on the
    /// global layers only, `sliding_window_pattern`) give what transformers 5's per-layer-type
    /// `rope_parameters` give.
    #[test]
    fn gemma3_old_and_new_rope_keys_agree() {
        let base = json!({"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 8});
        let mut old = base.clone();
        old["rope_theta"] = json!(1000000.0);
        old["rope_local_base_freq"] = json!(10000.0);
        old["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        old["sliding_window_pattern"] = json!(2);
        let mut new = base.clone();
        new["rope_parameters"] = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}});
        new["layer_types"] = json!([
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention"
        ]);
        let (a, b) = (decoder_of(old), decoder_of(new));
        assert_eq!(a.rope.inv_freq, b.rope.inv_freq);
        assert_eq!(
            a.local_rope.as_ref().unwrap().inv_freq,
            b.local_rope.as_ref().unwrap().inv_freq
        );
        assert_ne!(a.rope.inv_freq, a.local_rope.unwrap().inv_freq);
        assert_eq!(a.sliding, b.sliding);
        assert_eq!(a.windows, vec![Some(4096), None, Some(4096), None]);
        assert_eq!(
            a.attn_scale,
            1.0 / 16.0,
            "query_pre_attn_scalar defaults to 256"
        );
        assert_eq!(a.embed_scale, Some(8f64.sqrt() as f32));
        let mut bidirectional = base.clone();
        bidirectional["use_bidirectional_attention"] = json!(true);
        let e = cfg(bidirectional).unwrap_err().to_string();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
    }

    /// A multimodal Gemma 3 reads its text tower's settings from `text_config`, and needs one.
    #[test]
    fn gemma3_reads_text_config() {
        let text = json!({"model_type": "gemma3_text", "vocab_size": 12, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 4});
        let c = cfg(json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text})).unwrap();
        assert_eq!((c.arch, c.vocab), (Arch::Gemma3, 12));
        let e = cfg(json!({"model_type": "gemma3"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config"), "{e}");
    }

    /// Qwen3's defaults follow Qwen3Config: head_dim 128, no window without use_sliding_window.
    #[test]
    fn qwen3_defaults_follow_transformers() {
        let v = json!({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "sliding_window": 4, "max_window_layers": 1});
        let d = decoder_of(v.clone());
        assert_eq!((d.head_dim, d.qk_norm, d.qkv_bias), (128, true, false));
        assert_eq!(d.windows, vec![None, None]);
        let mut w = v;
        w["use_sliding_window"] = json!(true);
        assert_eq!(decoder_of(w).windows, vec![None, Some(4)]);
    }

    /// Phi-3's partial rotary narrows the tables; LongRoPE is computed as transformers does;
    /// yarn and partial rotary elsewhere are refused by name.
    #[test]
    fn phi3_partial_rotary_and_refusals() {
        let base = json!({"model_type": "phi3", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "partial_rotary_factor": 0.75});
        let d = decoder_of(base.clone());
        assert_eq!((d.head_dim, d.rope.inv_freq.len(), d.fused), (16, 6, true));
        // LongRoPE (legacy `rope_scaling` with `type`): the short factors, the long ones past the
        // original context, cos/sin times sqrt(1 + ln(factor) / ln(original)).
        let mut long = base.clone();
        long["max_position_embeddings"] = json!(4096);
        long["original_max_position_embeddings"] = json!(1024);
        long["rope_scaling"] = json!({"type": "longrope", "short_factor": [1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
            "long_factor": [8.0, 8.0, 8.0, 8.0, 8.0, 8.0]});
        let d = decoder_of(long.clone());
        let plain = decoder_of(base.clone()).rope.inv_freq;
        assert_eq!(d.rope.inv_freq[0], plain[0]);
        assert_eq!(d.rope.inv_freq[5], plain[5] / 4.0);
        assert_eq!(d.rope.frequencies(&[0, 1023]), &d.rope.inv_freq[..]);
        let far = d.rope.frequencies(&[0, 1024]).to_vec();
        assert_eq!(far[2], plain[2] / 8.0);
        let want = (1.0 + 4f64.ln() / 1024f64.ln()).sqrt() as f32;
        assert_eq!(d.rope.scaling, want);
        let (cos, _) = d.rope.tables(&[0]);
        assert_eq!(cos[(0, 0)], want);
        let mut short = long;
        short["rope_scaling"]["short_factor"] = json!([1.0]);
        let e = cfg(short).unwrap_err().to_string();
        assert!(
            e.contains("`short_factor` has 1 numbers, expected 6"),
            "{e}"
        );
        let mut yarn = base.clone();
        yarn["model_type"] = json!("qwen3");
        yarn["partial_rotary_factor"] = json!(1.0);
        yarn["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let e = cfg(yarn).unwrap_err().to_string();
        assert!(e.contains("rope type `yarn` is not supported"), "{e}");
        let mut llama = base;
        llama["model_type"] = json!("llama");
        let e = cfg(llama).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
    }

    #[test]
    fn task_type_follows_the_class() {
        let mut v = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16});
        for (class, task) in [
            ("BertModel", Some("FEATURE_EXTRACTION")),
            ("BertForSequenceClassification", None),
            ("BertForMaskedLM", None),
        ] {
            v["architectures"] = json!([class]);
            assert_eq!(cfg(v.clone()).unwrap().task_type(), task);
        }
    }
}
