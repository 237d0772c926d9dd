"""Shared by the tests: the repository's fixtures, tokenized as `eva init --model` tokenizes them
(the checkpoint's tokenizer.json, its post-processor's special tokens, truncation to the maximum
length) and padded on the right with an attention mask."""

import json
import os
import subprocess
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
BERT = ROOT / "tests" / "reference" / "bert"
QWEN3_MOE = ROOT / "tests" / "reference" / "qwen3_moe"
SAMPLE = ROOT / "examples" / "data" / "sample.txt"
TARGETS = {
    "tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "qwen3-moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# PEFT's target_parameters of the mixture-of-experts fixture (its routed experts).
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MODELS = {"tiny-llama": TINY_LLAMA, "bert": BERT, "qwen3-moe": QWEN3_MOE}


def eva_bin():
    """The eva binary the Rust tests built (or $EVA_BIN)."""
    return os.environ.get("EVA_BIN", str(ROOT / "target" / "debug" / "eva"))


def load_model(model_dir):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def texts(path=SAMPLE):
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


class Encoded(torch.utils.data.Dataset):
    """Examples tokenized one by one, as the CLI does."""

    def __init__(self, model_dir, lines, max_len):
        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_len)
        self.items = [tok.encode(t) for t in lines]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        e = self.items[i]
        return {"ids": e.ids, "type_ids": e.type_ids}


def collate(bert):
    def f(items):
        n = max(len(x["ids"]) for x in items)
        ids = torch.zeros((len(items), n), dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        types = torch.zeros((len(items), n), dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, : len(x["ids"])] = torch.tensor(x["ids"])
            mask[i, : len(x["ids"])] = 1
            types[i, : len(x["ids"])] = torch.tensor(x["type_ids"])
        batch = {"input_ids": ids, "attention_mask": mask}
        if bert:
            batch["token_type_ids"] = types
        return batch

    return f


def loader(name, batch_size, max_len=32, sampler=None, lines=None):
    ds = Encoded(MODELS[name], texts() if lines is None else lines, max_len)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collate(name == "bert")
    )


def cli_adapter(name, out, batch_size, rank=4, max_len=32, extra=()):
    """`eva init --model` on the same examples; returns {module name: lora_A} and the config."""
    from safetensors.torch import load_file

    subprocess.run(
        [eva_bin(), "init", "--model", str(MODELS[name]), "--data", str(SAMPLE), "--out", str(out),
         "--rank", str(rank), "--batch-size", str(batch_size), "--max-seq-len", str(max_len), "-q", "--force", *extra],
        check=True,
    )
    tensors = load_file(str(Path(out) / "adapter_model.safetensors"))
    a = {k[len("base_model.model."):-len(".lora_A.weight")]: v for k, v in tensors.items() if k.endswith("lora_A.weight")}
    return a, json.loads((Path(out) / "adapter_config.json").read_text())
