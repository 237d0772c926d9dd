#!/usr/bin/env python3
"""PEFT's EVA on the same model, data and machine as `cargo bench --bench forward`, for the
comparison in docs/model.md. Run by hand in the scratch virtual environment (never in CI):

    /tmp/ref/bin/python tests/reference/peft_eva_bench.py MODEL_DIR DATA.txt [--exact EVA_EXACT_ADAPTER] [--eva EVA_ADAPTER]

It tokenizes DATA with MODEL_DIR/tokenizer.json (truncation 128, padded per batch of --batch examples, 32 by default, as eva),
times PyTorch's forward over all batches (tokens/s), then times PEFT's EVA initialization
(`get_peft_model` + `initialize_lora_eva_weights`, r = 8, rho = 2, tau = 0.99, every linear layer
inside the blocks). With --exact (an adapter eva wrote with `--no-early-stop --estimator exact`,
i.e. the exact PCA of all the data), it reports each method's mean subspace similarity to the
exact components at the ranks it allocated (PEFT's, and with --eva, eva's default run's).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from safetensors.torch import load_file
from tokenizers import Tokenizer

MAX_SEQ_LEN = 128


def batches(model_dir, data, batch):
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_SEQ_LEN)
    texts = [l for l in Path(data).read_text().splitlines() if l.strip()]
    out = []
    for i in range(0, len(texts), batch):
        encs = [tok.encode(t) for t in texts[i : i + batch]]
        n = max(len(e.ids) for e in encs)
        ids = torch.zeros((len(encs), n), dtype=torch.long)
        mask = torch.zeros((len(encs), n), dtype=torch.long)
        for j, e in enumerate(encs):
            ids[j, : len(e.ids)] = torch.tensor(e.ids)
            mask[j, : len(e.ids)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def targets(cfg):
    if cfg["model_type"] in ("bert", "roberta"):
        # A full-match regex: every linear layer inside the blocks, not the pooler.
        return r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def similarity(a, u):
    """||Q_a^T U||_F^2 / r for the rows of a (r x d) and orthonormal rows of u (r x d)."""
    q, _ = torch.linalg.qr(a.double().T)
    return float((q.T @ u.double().T).pow(2).sum() / a.shape[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--exact")
    p.add_argument("--eva")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="examples per batch (eva's --batch-size)")
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(args.model, dtype=torch.float32).eval()
    data = batches(args.model, args.data, args.batch)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {__import__('peft').__version__}")
    print(f"{args.model}: {cls.__name__}, {len(data)} batches, {tokens} tokens")

    with torch.no_grad():
        model(**data[0])
        t = time.perf_counter()
        for b in data:
            model(**b)
        fwd = time.perf_counter() - t
    print(f"pytorch forward: {tokens / fwd:.0f} tokens/s ({fwd:.2f} s)")
    if args.forward_only:
        return

    # PEFT cycles its data loader with itertools.cycle, which replays saved batches: count the
    # model's forward calls instead (its first, hashing, pass included).
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    config = LoraConfig(r=8, lora_alpha=8, target_modules=targets(cfg), init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))
    t = time.perf_counter()
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, data, show_progress_bar=False)
    eva_time = time.perf_counter() - t
    print(f"peft eva init: {eva_time:.2f} s, {forwards[0]} forward passes ({len(data)} batches in the data)")

    if args.exact:
        exact = load_file(str(Path(args.exact) / "adapter_model.safetensors"))

        def score(named_a):
            sims = []
            for key, a in named_a.items():
                u = exact[key][: a.shape[0]]
                if u.shape[0] < a.shape[0]:
                    continue
                sims.append(similarity(a, u))
            return sum(sims) / len(sims), min(sims), len(sims)

        peft_a = {f"{n}.lora_A.weight": m.lora_A["default"].weight.detach() for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        peft_a = {k: v for k, v in peft_a.items() if k in exact}
        mean, low, n = score(peft_a)
        print(f"peft eva vs exact PCA of all data: mean subspace similarity {mean:.4f}, min {low:.4f} ({n} layers)")
        if args.eva:
            eva_a = {k: v for k, v in load_file(str(Path(args.eva) / "adapter_model.safetensors")).items() if k.endswith("lora_A.weight")}
            mean, low, n = score(eva_a)
            print(f"eva (default early stop) vs exact PCA of all data: mean subspace similarity {mean:.4f}, min {low:.4f} ({n} layers)")


if __name__ == "__main__":
    main()
