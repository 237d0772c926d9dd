//! `config.json` of a HuggingFace model, read into the few numbers the forward passes need,
//! including the variants seen in the wild (transformers 4 and 5 RoPE keys, `head_dim`, GQA,
//! biases, sliding windows, RoBERTa's position offset).

use crate::device::backend::{Activation, Rope};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The `model_type` values eva runs.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "bert", "roberta"];

/// A supported architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
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
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
        }
    }

    /// Whether this is a causal decoder (Llama family) rather than a bidirectional encoder.
    pub fn is_decoder(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral | Arch::Qwen2)
    }
}

/// Llama-family settings (llama, mistral, qwen2).
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
    pub rope: Rope,
    /// A human-readable RoPE description for `eva inspect`.
    pub rope_desc: String,
    /// Bias on q/k/v, on o, and on gate/up/down.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Sliding window per layer (`None` = full causal attention).
    pub windows: Vec<Option<usize>>,
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
    Decoder(DecoderConfig),
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

    fn act(&self, default: &str) -> Result<Activation> {
        let name = match self.v.get("hidden_act") {
            None | Some(Value::Null) => default,
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err("hidden_act", "a string"))?,
        };
        Activation::parse(name).ok_or_else(|| {
            Error::data(format!(
                "{}: hidden_act `{name}` is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu)",
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
    let r = Reader { v, path };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
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
    let vocab = r.usize("vocab_size")?;
    let pad_token_id = v
        .get("pad_token_id")
        .and_then(Value::as_u64)
        .map(|p| p as u32);
    let hidden = r.usize("hidden_size")?;
    let intermediate = r.usize("intermediate_size")?;
    let layers = r.usize("num_hidden_layers")?;
    let heads = r.usize("num_attention_heads")?;
    let family = if arch.is_decoder() {
        let kv_heads = r.usize_or("num_key_value_heads", heads)?;
        if heads % kv_heads != 0 {
            return Err(Error::data(format!(
                "{}: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}",
                path.display()
            )));
        }
        if hidden % heads != 0 && v.get("head_dim").is_none_or(Value::is_null) {
            return Err(Error::data(format!(
                "{}: hidden_size = {hidden} is not a multiple of num_attention_heads = {heads} and no head_dim is given",
                path.display()
            )));
        }
        let head_dim = r.usize_or("head_dim", hidden / heads)?;
        if head_dim % 2 != 0 {
            return Err(Error::data(format!(
                "{}: head_dim = {head_dim} must be even for rotary embeddings",
                path.display()
            )));
        }
        let (rope, rope_desc) = rope(&r, head_dim)?;
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama => {
                let a = r.bool_or("attention_bias", false)?;
                (a, a, r.bool_or("mlp_bias", false)?)
            }
            // Qwen2Attention: q/k/v with bias, o_proj without (transformers' modeling_qwen2.py).
            Arch::Qwen2 => (true, false, false),
            _ => (false, false, false),
        };
        DecoderConfig {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            eps: r.f64_or("rms_norm_eps", 1e-6)? as f32,
            act: r.act("silu")?,
            rope,
            rope_desc,
            qkv_bias,
            o_bias,
            mlp_bias,
            windows: windows(&r, arch, layers)?,
        }
        .into()
    } else {
        let pet = v
            .get("position_embedding_type")
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
        EncoderConfig {
            hidden,
            intermediate,
            layers,
            heads,
            eps: r.f64_or("layer_norm_eps", 1e-12)? as f32,
            act: r.act("gelu")?,
            max_positions,
            type_vocab: r.usize_or("type_vocab_size", 2)?,
            position_offset,
        }
        .into()
    };
    Ok(ModelConfig {
        arch,
        class,
        vocab,
        pad_token_id,
        family,
    })
}

impl From<DecoderConfig> for Family {
    fn from(c: DecoderConfig) -> Self {
        Family::Decoder(c)
    }
}

impl From<EncoderConfig> for Family {
    fn from(c: EncoderConfig) -> Self {
        Family::Encoder(c)
    }
}

/// RoPE inverse frequencies. `rope_theta` sits at top level (transformers 4) or inside
/// `rope_parameters` (transformers 5); scaling comes from `rope_parameters.rope_type` or
/// `rope_scaling.{rope_type,type}`. Formulas: transformers' `modeling_rope_utils.py`.
fn rope(r: &Reader, head_dim: usize) -> Result<(Rope, String)> {
    let params = r.v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = r.v.get("rope_scaling").filter(|p| p.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| r.v.get("rope_theta"))
        .map(|t| {
            t.as_f64()
                .filter(|t| *t > 0.0)
                .ok_or_else(|| r.err("rope_theta", "a positive number"))
        })
        .transpose()?
        .unwrap_or(10000.0);
    let spec = params.or(scaling);
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
    if spec
        .and_then(|s| s.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .is_some_and(|f| f != 1.0)
        || r.v
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .is_some_and(|f| f != 1.0)
    {
        return Err(Error::data(format!(
            "{}: partial_rotary_factor != 1 is not supported",
            r.path.display()
        )));
    }
    // inv_freq[i] = theta^(-2i/d), as transformers computes it: exponent and power in f32.
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta as f32).powf(e) as f64
        })
        .collect();
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
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old = num("original_max_position_embeddings")?;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let inv = base
                .iter()
                .map(|&f| {
                    let f = f as f32 as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    }
                })
                .collect();
            (inv, format!("theta {theta}, llama3 x{factor}"))
        }
        other => {
            return Err(Error::data(format!(
                "{}: rope type `{other}` is not supported (supported: default, linear, llama3)",
                r.path.display()
            )))
        }
    };
    Ok((
        Rope {
            inv_freq: inv.into_iter().map(|f| f as f32).collect(),
        },
        desc,
    ))
}

/// Sliding-window size per layer: Mistral's `sliding_window`; Qwen2's only with
/// `use_sliding_window`, from layer `max_window_layers` on; an explicit `layer_types` list wins.
/// A window the model does not use is not read (transformers ignores it too).
///
/// `sliding_window: 0` is refused where it is used. transformers 5.24's mask for it
/// (`masking_utils.sliding_window_overlay`, `kv_idx > q_idx - 0`, with causality
/// `kv_idx <= q_idx`) keeps no key at all, and what the model then computes is an accident of
/// the attention implementation: eager attention adds `finfo.min` everywhere and so averages
/// every key of the sequence, future ones included; SDPA gives yet other values; a cache fails on
/// a shape mismatch. There is no model to match; both of eva's backends give a window of 0 the
/// mask's meaning (no key, output 0) if asked directly.
fn windows(r: &Reader, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>> {
    let used = match arch {
        Arch::Mistral => true,
        Arch::Qwen2 => r.bool_or("use_sliding_window", false)?,
        _ => false,
    };
    let window = match r.v.get("sliding_window") {
        None | Some(Value::Null) => None,
        Some(_) if !used => None,
        Some(v) if v.as_u64() == Some(0) => {
            return Err(Error::data(format!(
                "{}: `sliding_window` 0 keeps no key at all (transformers' mask \
                 `kv_idx > q_idx - sliding_window` with `kv_idx <= q_idx`), and transformers' eager \
                 and SDPA attention then disagree (eager averages every key, future ones \
                 included): set a positive window, or null for full causal attention",
                r.path.display()
            )))
        }
        Some(_) => Some(r.usize("sliding_window")?),
    };
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
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => Ok(window),
                _ => Err(Error::data(format!(
                    "{}: layer_types entry {t} is not supported (expected full_attention or sliding_attention)",
                    r.path.display()
                ))),
            })
            .collect();
    }
    let first = match arch {
        // Qwen2Config's default max_window_layers is 28.
        Arch::Qwen2 => {
            r.v.get("max_window_layers")
                .and_then(Value::as_u64)
                .unwrap_or(28) as usize
        }
        _ => 0,
    };
    Ok((0..layers)
        .map(|i| if i >= first { window } else { None })
        .collect())
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
            e.contains("gpt2") && e.contains("llama, mistral, qwen2, bert, roberta"),
            "{e}"
        );
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
