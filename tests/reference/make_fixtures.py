#!/usr/bin/env python3
"""Writes the tiny random checkpoints under tests/reference/<arch>/ and the layer inputs PyTorch
computes for them, so that eva's Rust tests compare against transformers without needing PyTorch.

Run it by hand (never in CI), from the repository root, in a scratch virtual environment:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft safetensors tokenizers
    /tmp/ref/bin/python tests/reference/make_fixtures.py

For each architecture it writes:
- config.json, model.safetensors (or shards + model.safetensors.index.json), tokenizer.json:
  a 2-block model with random weights, every norm weight and bias perturbed away from 1 / 0 so
  that a missing bias or a wrong norm shows, and a tokenizer trained on examples/data/sample.txt;
- reference.safetensors: for every nn.Linear inside the transformer blocks, the rows of its input
  (forward pre-hook) that eva must capture: real tokens (attention_mask = 1) whose label is not
  -100 (prompt tokens of prompt/completion examples are labelled -100), in batch order, float32,
  keyed by module name; plus the padded batch `input_ids`, `attention_mask` and `keep` (int64).
  The metadata holds `max_seq_len`.

It also writes examples/tiny-llama/, the checkpoint the README's main command runs on.

With architecture names as arguments (e.g. `make_fixtures.py qwen3 phi3`) it writes only those
fixtures, leaving every other file as it is.

With EVA_MINILM_DIR pointing at the real all-MiniLM-L6-v2 (see .ci/run), it writes only
tests/reference/minilm/pca.safetensors (see `minilm` below).

The checkpoints cover the config variants eva must read: transformers-5 `rope_parameters` with
llama3 scaling (llama), top-level `rope_theta` and sliding-window attention (mistral, edited into
the old config style), `head_dim` != hidden/heads and a single KV head (mistral), GQA, tied
embeddings, `attention_bias` and `mlp_bias` (llama), Qwen2's q/k/v bias, key prefixes `model.`,
`bert.` and none, F32 / BF16 / F16 weights, sharded weights (llama), RoBERTa's padding-offset
positions, BERT's token types and pooler/classifier heads (which eva must skip).
The 2026 families add: Qwen3's per-head q/k norms, explicit head_dim (heads x head_dim != hidden)
and a sliding-window layer (qwen3, BF16, tied); Gemma 3's `1 + w` norms, scaled embeddings, four
norms per block, query_pre_attn_scalar, a soft-capping setting that transformers ignores, per-layer-type RoPE with linear scaling on
the global layers (gemma3_text, sharded F32), and the multimodal checkpoint whose text tower has
keys `model.language_model.*` beside a vision tower (gemma3, BF16); Phi-3's fused qkv_proj and
gate_up_proj, partial rotary, LongRoPE and a sliding window on every layer (phi3, F16, untied).

Mixture-of-experts checkpoints (mixtral, qwen2_moe, qwen3_moe) also record, for every expert `e` of a sparse
block, the rows routed to it as `<prefix>layers.N.mlp.experts.gate_up_proj[e]` (the hidden states
of its tokens, in transformers' order: by top-k position, then token) and
`...down_proj[e]` (`act(gate) · up` of those rows), hooked on the `*Experts` module, kept tokens
only. They cover per-expert keys on disk (`experts.N.w1` under Mixtral's `block_sparse_moe`, as
`save_pretrained` writes them) and transformers 5's fused 3-D keys (qwen2_moe, written from the
state dict), a shared expert with its sigmoid gate, a dense block (`mlp_only_layers`), BF16.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import transformers
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2Model,
    RobertaConfig,
    RobertaModel,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "reference"
SAMPLE = ROOT / "examples" / "data" / "sample.txt"
DATA = HERE / "data.jsonl"
MAX_SEQ_LEN = 24


def corpus():
    return [l.strip() for l in SAMPLE.read_text().splitlines() if l.strip()]


def byte_level_bpe(vocab, specials, post):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = post(tok)
    return tok


def llama_tokenizer(vocab=400):
    return byte_level_bpe(
        vocab,
        ["<s>", "</s>", "<pad>"],
        lambda t: processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", t.token_to_id("<s>"))]),
    )


def qwen_tokenizer():
    # Qwen2's tokenizer adds no special tokens: its post-processor is ByteLevel only.
    return byte_level_bpe(400, ["<|endoftext|>"], lambda t: processors.ByteLevel(trim_offsets=False))


def roberta_tokenizer():
    tok = byte_level_bpe(400, ["<s>", "<pad>", "</s>", "<unk>"], lambda t: processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False))
    assert tok.token_to_id("<pad>") == 1
    return tok


def sentencepiece_bpe():
    # Mistral-like: Metaspace pre-tokenization, <s> prepended.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def bert_tokenizer():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def perturb(model, seed, scale):
    """Random weights with a larger spread than HF's init, norm weights near 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(scale * noise)


def examples():
    """The reference data: text lines and prompt/completion pairs, one blank line (skipped)."""
    rows = [line for line in DATA.read_text().splitlines()]
    out = []
    for line in rows:
        if not line.strip():
            continue
        out.append(json.loads(line))
    return out


def encode(tok, ex):
    """Token ids, type ids and the label mask eva must reproduce: prompt tokens (and special
    tokens before the first completion token) are label -100."""
    if "text" in ex:
        enc = tok.encode(ex["text"])
        return enc.ids, enc.type_ids, [1] * len(enc.ids)
    prompt, completion = ex["prompt"], ex["completion"]
    enc = tok.encode(prompt + completion)
    # Offsets are character offsets in Python (byte offsets in Rust): the data is ASCII.
    labels, seen_completion = [], False
    for (start, end), special in zip(enc.offsets, enc.special_tokens_mask):
        if special:
            labels.append(1 if seen_completion else 0)
        elif end <= len(prompt):
            labels.append(0)
        else:
            seen_completion = True
            labels.append(1)
    return enc.ids, enc.type_ids, labels


def reference(model_dir, tok, pad_id, block_prefix, skip=lambda name: False):
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    exs = examples()
    encs = [encode(tok, e) for e in exs]
    length = max(len(e[0]) for e in encs)
    ids = torch.full((len(encs), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(encs), length), dtype=torch.long)
    mask = torch.zeros((len(encs), length), dtype=torch.long)
    keep = torch.zeros((len(encs), length), dtype=torch.long)
    for i, (a, t, l) in enumerate(encs):
        ids[i, : len(a)] = torch.tensor(a)
        types[i, : len(t)] = torch.tensor(t)
        mask[i, : len(a)] = 1
        keep[i, : len(a)] = torch.tensor(l)
    captured = {}
    # AutoModel loads the bare model: its module names have no task-head prefix. The checkpoint's
    # own key prefix (e.g. `bert.`, `model.`) is added back so that names match eva's.
    prefix = block_prefix

    def hook(name):
        def f(_module, args):
            x = args[0].detach()
            # A MoE block's shared expert sees the tokens flattened to [batch * length, hidden].
            k = keep.bool() if x.dim() == 3 else keep.reshape(-1).bool()
            captured[prefix + name] = x[k].contiguous().float()

        return f

    def expert_hook(name):
        # The rows each expert reads, as the *Experts module gathers them: for expert e,
        # torch.where over its [top_k, tokens] mask orders them by top-k position, then token.
        def f(module, args):
            x, top_k_index = args[0].detach(), args[1]
            flat_keep = keep.reshape(-1).bool()
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=module.num_experts).permute(2, 1, 0)
            for e in range(module.num_experts):
                pos, tok = torch.where(mask[e])
                tok = tok[flat_keep[tok]]
                xe = x[tok]
                gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                captured[f"{prefix}{name}.gate_up_proj[{e}]"] = xe.contiguous().float()
                captured[f"{prefix}{name}.down_proj[{e}]"] = (module.act_fn(gate) * up).detach().contiguous().float()

        return f

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in "." + name or "encoder.layer." in name) and not skip(name):
            module.register_forward_pre_hook(hook(name))
        if type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj"):
            module.register_forward_pre_hook(expert_hook(name))
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if "token_type_ids" in model.forward.__code__.co_varnames:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        model(**kwargs)
    tensors = dict(captured)
    tensors["input_ids"] = ids
    tensors["attention_mask"] = mask
    tensors["keep"] = keep
    save_file(tensors, str(Path(model_dir) / "reference.safetensors"), metadata={"format": "pt", "max_seq_len": str(MAX_SEQ_LEN)})
    return {k: tuple(v.shape) for k, v in captured.items()}


def fresh(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save(model, tok, out, dtype, **kw):
    model.to(dtype).save_pretrained(out, **kw)
    t = Tokenizer.from_str(tok.to_str())
    t.no_truncation()
    t.no_padding()
    t.save(str(out / "tokenizer.json"))
    tok.enable_truncation(MAX_SEQ_LEN)


def edit_config(out, fn):
    p = out / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def llama():
    out = fresh(HERE / "llama")
    tok = llama_tokenizer()
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
    )
    torch.manual_seed(1)
    m = LlamaForCausalLM(cfg)
    perturb(m, 1, 0.1)
    save(m, tok, out, torch.float32, max_shard_size="150KB")
    return reference(out, tok, tok.token_to_id("<pad>"), "model.")


def mistral():
    out = fresh(HERE / "mistral")
    tok = sentencepiece_bpe()
    cfg = MistralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=8,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(2)
    m = MistralForCausalLM(cfg)
    perturb(m, 2, 0.1)
    save(m, tok, out, torch.bfloat16)

    # The pre-transformers-5 style: rope_theta at top level, no rope_parameters.
    def old_style(c):
        rp = c.pop("rope_parameters")
        assert rp.get("rope_type", "default") == "default"
        c["rope_theta"] = 50000.0

    edit_config(out, old_style)
    return reference(out, tok, 0, "model.")


def qwen2():
    out = fresh(HERE / "qwen2")
    tok = qwen_tokenizer()
    cfg = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    m = Qwen2Model(cfg)
    perturb(m, 3, 0.1)
    save(m, tok, out, torch.float16)
    return reference(out, tok, tok.token_to_id("<|endoftext|>"), "")


def bert():
    out = fresh(HERE / "bert")
    tok = bert_tokenizer()
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=3,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    torch.manual_seed(4)
    m = BertForSequenceClassification(cfg)
    perturb(m, 4, 0.1)
    save(m, tok, out, torch.float32)
    return reference(out, tok, tok.token_to_id("[PAD]"), "bert.")


def roberta():
    out = fresh(HERE / "roberta")
    tok = roberta_tokenizer()
    cfg = RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_SEQ_LEN + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(5)
    m = RobertaModel(cfg)
    perturb(m, 5, 0.1)
    save(m, tok, out, torch.float32)
    return reference(out, tok, 1, "")


def qwen3():
    """Qwen3: q/k RMSNorm per head before RoPE, head_dim 16 with hidden 32 (o_proj reads 64
    features), no biases, layer 1 a sliding-window layer (use_sliding_window, max_window_layers),
    BF16 weights, tied embeddings."""
    out = fresh(HERE / "qwen3")
    tok = qwen_tokenizer()
    cfg = Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        tie_word_embeddings=True,
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
    torch.manual_seed(7)
    m = Qwen3ForCausalLM(cfg)
    perturb(m, 7, 0.1)
    save(m, tok, out, torch.bfloat16)
    return reference(out, tok, tok.token_to_id("<|endoftext|>"), "model.")


def gemma3_text_config(tok):
    return Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        rms_norm_eps=1e-6,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )


def gemma3_text():
    """Gemma 3 (text): RMSNorm x(1 + w) (norm weights perturbed around 0, as Gemma stores them),
    embeddings x sqrt(hidden), four norms per block, q/k norms, query_pre_attn_scalar 24 (not
    head_dim), attn_logit_softcapping set (which Gemma3Attention ignores), a sliding layer with its own RoPE base and a global layer
    with linear RoPE scaling, GELU-tanh; sharded F32, tied embeddings."""
    out = fresh(HERE / "gemma3_text")
    tok = llama_tokenizer()
    cfg = gemma3_text_config(tok)
    torch.manual_seed(8)
    m = Gemma3ForCausalLM(cfg)
    perturb(m, 8, 0.1)
    gemma_norms(m, 8)
    save(m, tok, out, torch.float32, max_shard_size="40KB")
    return reference(out, tok, tok.token_to_id("<pad>"), "model.")


def gemma_norms(m, seed):
    """Gemma's norm weights are offsets from 1: perturb them around 0."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def gemma3():
    """Gemma 3 multimodal (Gemma3ForConditionalGeneration): a tiny SigLIP vision tower beside the
    text tower of gemma3_text's shape; keys `model.language_model.*`, settings in `text_config`;
    BF16. eva runs only the text tower."""
    out = fresh(HERE / "gemma3")
    tok = llama_tokenizer()
    text = gemma3_text_config(tok)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=14, patch_size=7)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5)
    torch.manual_seed(9)
    m = Gemma3ForConditionalGeneration(cfg)
    perturb(m, 9, 0.1)
    gemma_norms(m, 9)
    save(m, tok, out, torch.bfloat16)
    return reference(out, tok, tok.token_to_id("<pad>"), "model.")


def phi3():
    """Phi-3: fused qkv_proj and gate_up_proj, partial rotary (half of each head), LongRoPE
    (short factors, attention factor), a sliding window on every layer, GQA; F16, untied."""
    out = fresh(HERE / "phi3")
    tok = llama_tokenizer()
    cfg = Phi3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        original_max_position_embeddings=64,
        # LongRoPE with the short factors (every batch is shorter than 64 positions) and the
        # attention factor sqrt(1 + ln(128 / 64) / ln 64) on cos/sin.
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.7],
            "long_factor": [2.5, 9.0],
            "original_max_position_embeddings": 64,
        },
        sliding_window=7,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
    )
    torch.manual_seed(10)
    m = Phi3ForCausalLM(cfg)
    perturb(m, 10, 0.1)
    save(m, tok, out, torch.float16)
    return reference(out, tok, tok.token_to_id("<pad>"), "model.")


def mixtral():
    out = fresh(HERE / "mixtral")
    tok = sentencepiece_bpe()
    cfg = MixtralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(7)
    m = MixtralForCausalLM(cfg)
    perturb(m, 7, 0.3)
    # save_pretrained writes one key per expert (block_sparse_moe.experts.N.w1/w2/w3).
    save(m, tok, out, torch.bfloat16)
    return reference(out, tok, 0, "model.")


def qwen2_moe():
    out = fresh(HERE / "qwen2_moe")
    tok = qwen_tokenizer()
    cfg = Qwen2MoeConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(8)
    m = Qwen2MoeForCausalLM(cfg)
    perturb(m, 8, 0.3)
    save(m, tok, out, torch.float32)
    # Transformers 5's fused 3-D expert keys (mlp.experts.gate_up_proj [E, 2f, h]) instead of
    # the per-expert keys save_pretrained writes: the state dict as the model holds it.
    (out / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return reference(out, tok, tok.token_to_id("<|endoftext|>"), "model.")


def qwen3_moe():
    """Qwen3-MoE: Qwen3's attention (q/k norms, head_dim 16 with hidden 32) and sparse blocks
    without a shared expert, norm_topk_prob, a dense block (decoder_sparse_step 2: block 0 dense),
    8 experts, top-2; per-expert keys as save_pretrained writes them, BF16, tied embeddings."""
    out = fresh(HERE / "qwen3_moe")
    tok = qwen_tokenizer()
    cfg = Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=40,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(11)
    m = Qwen3MoeForCausalLM(cfg)
    perturb(m, 11, 0.3)
    save(m, tok, out, torch.bfloat16)
    # The dense block's MLP is no target: PEFT 0.21 rewrites gate_proj/up_proj/down_proj targets
    # of a Qwen3-MoE model into the experts' parameters, so eva leaves it out.
    dense_mlp = lambda name: ".mlp." in name and ".experts" not in name
    return reference(out, tok, tok.token_to_id("<|endoftext|>"), "model.", skip=dense_mlp)


def train_text():
    """examples/data/train.txt: 400 examples of 3-8 sentences of sample.txt each (fixed seed), enough
    for the README's run on examples/tiny-llama to converge."""
    import random

    rng = random.Random(0)
    lines = corpus()
    out = [" ".join(rng.choice(lines) for _ in range(rng.randint(3, 8))) for _ in range(400)]
    (ROOT / "examples" / "data" / "train.txt").write_text("\n".join(out) + "\n")


def tiny_llama():
    """examples/tiny-llama: the README's checkpoint (4 blocks, random weights, BF16)."""
    out = fresh(ROOT / "examples" / "tiny-llama")
    tok = llama_tokenizer(vocab=1024)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
    )
    torch.manual_seed(6)
    m = LlamaForCausalLM(cfg)
    perturb(m, 6, 0.1)
    save(m, tok, out, torch.bfloat16)


def minilm(model_dir):
    """tests/reference/minilm/pca.safetensors: for the real all-MiniLM-L6-v2 (not committed; see
    .ci/run), the float64 PCA of PyTorch's own layer inputs over examples/data/sample.txt
    (max_seq_len 128): per unique input (keyed by its first module), the top-4 components
    `<name>.components` [4, d] and `<name>.eigenvalues` [4] of the covariance, and its trace
    `<name>.trace` [1]; metadata `tokens`."""
    out = HERE / "minilm"
    out.mkdir(exist_ok=True)
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    model = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    encs = [tok.encode(t) for t in corpus()]
    captured = {}

    def hook(name):
        def f(_m, args):
            x = args[0].detach()[mask.bool()].double()
            captured.setdefault(name, []).append(x)

        return f

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "encoder.layer." in name:
            module.register_forward_pre_hook(hook(name))
            names.append(name)
    for start in range(0, len(encs), 16):
        chunk = encs[start : start + 16]
        n = max(len(e.ids) for e in chunk)
        ids = torch.zeros((len(chunk), n), dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    tensors, seen = {}, []
    for name in names:
        x = torch.cat(captured[name])
        if any(torch.equal(x, y) for y in seen):
            continue
        seen.append(x)
        c = torch.cov(x.T)
        vals, vecs = torch.linalg.eigh(c)
        tensors[f"{name}.components"] = vecs[:, -4:].flip(1).T.float().contiguous()
        tensors[f"{name}.eigenvalues"] = vals[-4:].flip(0).contiguous()
        tensors[f"{name}.trace"] = c.trace().reshape(1)
        tokens = x.shape[0]
    save_file(tensors, str(out / "pca.safetensors"), metadata={"format": "pt", "tokens": str(tokens), "max_seq_len": "128"})
    print(f"minilm: {len(seen)} unique inputs, {tokens} tokens")


if __name__ == "__main__":
    if os.environ.get("EVA_MINILM_DIR"):
        minilm(os.environ["EVA_MINILM_DIR"])
        raise SystemExit(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    every = (llama, mistral, qwen2, qwen3, gemma3_text, gemma3, phi3, mixtral, qwen2_moe, qwen3_moe, bert, roberta)
    chosen = [fn for fn in every if fn.__name__ in sys.argv[1:]] if len(sys.argv) > 1 else every
    for fn in chosen:
        shapes = fn()
        print(fn.__name__, len(shapes), "layers", sorted(set(shapes.values())))
    if len(sys.argv) == 1:
        tiny_llama()
        train_text()
    for d in sorted(HERE.iterdir()):
        if d.is_dir():
            size = sum(f.stat().st_size for f in d.iterdir())
            print(f"{d.name}: {size / 1024:.0f} KiB")
