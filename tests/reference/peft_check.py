#!/usr/bin/env python3
"""Checks that PEFT loads adapters eva wrote for a checkpoint, with B = 0 and unchanged outputs.
Run by hand in the scratch virtual environment (never in CI):

    cargo build --release
    /tmp/ref/bin/python tests/reference/peft_check.py target/release/eva

For each model (every fixture, and the README's tiny-llama; or only the fixtures named after the
binary: `peft_check.py target/release/eva qwen3 phi3`) it runs
`eva init --model DIR --data tests/reference/data.jsonl`, loads the base model with the class in
its config (`architectures[0]`), wraps it with `PeftModel.from_pretrained(base, adapter)`, and
checks: every adapter tensor is loaded into a LoRA module (A equal to the file, B zero), the
scaling is alpha_l / r_l, and the model's outputs (logits or hidden states) equal the base
model's on a batch of the data. For mixture-of-experts models the experts are PEFT
`target_parameters` (`ParamWrapper`s, nested when gate_up_proj and down_proj are both targeted):
`lora_A` holds r rows per expert and the rank and alpha are the parameter's.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "reference" / "data.jsonl"


def check(eva, model_dir, extra=()):
    out = Path(tempfile.mkdtemp()) / "adapter"
    subprocess.run([eva, "init", "--model", str(model_dir), "--data", str(DATA), "--out", str(out), "--rank", "4", "--max-seq-len", "24", "-q", *extra], check=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    torch.manual_seed(0)
    base = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(24)
    texts = [json.loads(l).get("text") or json.loads(l)["prompt"] for l in DATA.read_text().splitlines() if l.strip()]
    encs = [tok.encode(t) for t in texts]
    n = max(len(e.ids) for e in encs)
    ids = torch.zeros((len(encs), n), dtype=torch.long)
    mask = torch.zeros((len(encs), n), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask)
    ref = (ref.logits if hasattr(ref, "logits") else ref.last_hidden_state).clone()

    peft = PeftModel.from_pretrained(base, out).eval()
    weights = load_file(str(out / "adapter_model.safetensors"))
    acfg = json.loads((out / "adapter_config.json").read_text())
    loaded = 0
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = f"{name}.lora_A.weight"  # PeftModel's module names start with base_model.model.
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            assert torch.equal(a, weights[key]), name
            assert torch.count_nonzero(b) == 0, name
            r = module.r["default"]
            assert a.shape[0] == r * getattr(module, "num_experts", 1), (name, a.shape, r)
            layer = name.removeprefix("base_model.model.")
            if hasattr(module, "parameter_name"):
                # A ParamWrapper: rank and alpha are keyed by the parameter's path.
                layer = layer.replace(".base_layer", "") + "." + module.parameter_name
            alpha = acfg["alpha_pattern"].get(layer, acfg["lora_alpha"])
            assert abs(module.scaling["default"] - alpha / r) < 1e-12, (name, module.scaling["default"], alpha, r)
            loaded += 1
    assert loaded * 2 == len(weights), (loaded, len(weights))
    with torch.no_grad():
        got = peft(input_ids=ids, attention_mask=mask)
    got = got.logits if hasattr(got, "logits") else got.last_hidden_state
    diff = (got - ref).abs().max().item()
    assert diff == 0.0, diff
    print(f"{model_dir.name}: PeftModel.from_pretrained({cls.__name__}) loaded {loaded} LoRA layers (task_type {acfg['task_type']}, "
          f"ranks {sorted(set(acfg['rank_pattern'].values()) | {acfg['r']})}), B = 0, max |output - base| = {diff}")


if __name__ == "__main__":
    eva = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "eva")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {__import__('peft').__version__}")
    archs = ("llama", "bert", "mistral", "qwen2", "roberta", "qwen3", "gemma3_text", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
    chosen = [a for a in archs if a in sys.argv[2:]] or archs
    for arch in chosen:
        check(eva, ROOT / "tests" / "reference" / arch)
    if len(sys.argv) > 2:
        raise SystemExit(0)
    check(eva, ROOT / "examples" / "tiny-llama")
