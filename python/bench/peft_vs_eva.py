#!/usr/bin/env python3
"""PEFT's `initialize_lora_eva_weights` against eva_lora's drop-in, in one process, on the same
model, batches and batch size (docs/benchmarks.md, "Python drop-in"). Run by hand in the CI
virtual environment:

    ~/.cache/eva/py/bin/python python/bench/peft_vs_eva.py MODEL_DIR DATA.txt [--batch 32] [--threads 2] \
        [--targets all-linear|peft-default] [--estimators exact,sketch] [--full-passes]

Reports: PyTorch's forward over all batches; for each method its wall time, forward passes and
its own time (hooks, statistics, leader: wall minus the forward passes), for eva also the split
of its Rust side from eva_report.json (statistics, leader) and that side's share of the rest of
the same run's wall time (the forward passes, their hooks' Python side, loading), which does not
depend on the machine's load the way a separately timed pass does; and each method's mean subspace
similarity, at the ranks it allocated, to a float64 PCA of every layer input over all batches
(centered covariance of the masked tokens, from PyTorch's own activations). `--targets
peft-default` uses PEFT's default target modules of the architecture (q/v projections) instead
of every linear layer in the blocks; `--estimators` runs eva once per estimator; `--full-passes`
adds a run of the first estimator whose forward passes are never cut short
(`stop_forward_early=False`).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import EvaConfig, LoraConfig, get_peft_model
from peft import initialize_lora_eva_weights as peft_init
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "reference"))
from peft_eva_bench import batches, similarity, targets  # noqa: E402

import eva_lora  # noqa: E402


def load(model_dir):
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    return cfg, cls.from_pretrained(model_dir, dtype=torch.float32).eval()


def full_pca(model, data, names):
    """Top eigenvectors (rows, descending) of the centered float64 covariance of each named
    module's masked inputs over all of `data`."""
    stats = {}
    mods = dict(model.named_modules())
    mask = {}

    def hook_for(name):
        def hook(m, inp, out):
            x = inp[0][mask["m"]].double()
            s = stats.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x

        return hook

    hs = [mods[n].register_forward_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for b in data:
            mask["m"] = b["attention_mask"].bool()
            model(**b)
    for h in hs:
        h.remove()
    out = {}
    for n, (k, s, g) in stats.items():
        mean = s / k
        cov = (g - k * torch.outer(mean, mean)) / (k - 1)
        w, v = torch.linalg.eigh(cov)
        out[n] = v[:, torch.argsort(w, descending=True)].T
    return out


def lora_a(peft_model):
    return {
        n[len("base_model.model."):]: m.lora_A["default"].weight.detach()
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def closeness(a, exact):
    sims = [similarity(w, exact[n][: w.shape[0]]) for n, w in a.items() if w.shape[0] > 0]
    return sum(sims) / len(sims), min(sims)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", choices=["all-linear", "peft-default"], default="all-linear")
    p.add_argument("--estimators", default="exact", help="comma-separated eva estimators to run")
    p.add_argument("--full-passes", action="store_true", help="also run the first estimator with stop_forward_early=False")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model = load(args.model)
    data = batches(args.model, args.data, args.batch)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), peft {__import__('peft').__version__}")
    print(f"{args.model}: {len(data)} batches of {args.batch}, {tokens} tokens")
    with torch.no_grad():
        model(**data[0])
        t = time.perf_counter()
        for b in data:
            model(**b)
        fwd = (time.perf_counter() - t) / len(data)
    print(f"pytorch forward: {fwd * 1e3:.1f} ms per batch ({tokens / (fwd * len(data)):.0f} tokens/s)")

    modules = targets(cfg) if args.targets == "all-linear" else TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[cfg["model_type"]]

    def config():
        return LoraConfig(r=args.r, lora_alpha=args.r, target_modules=modules, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))

    def eva_with(estimator, label, **options):
        def init(pm, data, **kw):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "eva_report.json"
                out = eva_lora.initialize_lora_eva_weights(pm, data, estimator=estimator, report_path=str(path), **options, **kw)
                reports[label] = json.loads(path.read_text())
            return out

        return label, init

    reports = {}
    estimators = args.estimators.split(",")
    methods = [("peft", peft_init)] + [eva_with(e, f"eva_lora {e}") for e in estimators]
    if args.full_passes:
        methods.append(eva_with(estimators[0], f"eva_lora {estimators[0]} whole passes", stop_forward_early=False))
    print(f"targets: {modules}")
    results = {}
    for label, init in methods:
        _, base = load(args.model)
        forwards = [0]
        base.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        t = time.perf_counter()
        pm = get_peft_model(base, config(), low_cpu_mem_usage=True)
        init(pm, data, show_progress_bar=False)
        wall = time.perf_counter() - t
        own = wall - forwards[0] * fwd
        results[label] = lora_a(pm)
        line = f"{label}: {wall:.2f} s wall, {forwards[0]} forward passes, {own:.2f} s besides the forward passes ({100 * own / max(forwards[0] * fwd, 1e-9):.0f} % of their time)"
        if label.startswith("eva_lora"):
            ts = reports[label]["time_s"]
            rust = ts["statistics"] + ts["leader"] + ts["communication"]
            line += (
                f"; eva_report: statistics {ts['statistics']:.2f} s, leader {ts['leader']:.2f} s, "
                f"communication {ts['communication']:.2f} s: {100 * rust / (wall - rust):.0f} % of the rest of the wall time"
            )
        print(line)
        results[label + "_time"] = wall
    labels = [label for label, _ in methods]
    names = sorted({n for label in labels for n in results[label]})
    exact = full_pca(model, data, names)
    for label in labels:
        mean, low = closeness(results[label], exact)
        print(f"{label} vs float64 PCA of all batches: mean subspace similarity {mean:.4f}, min {low:.4f}")
    for label in labels[1:]:
        print(f"speed-up of {label}: {results['peft_time'] / results[label + '_time']:.1f}x")


if __name__ == "__main__":
    main()
