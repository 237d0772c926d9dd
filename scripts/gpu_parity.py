#!/usr/bin/env python3
"""eva's CUDA forward pass against PyTorch's own layer inputs, and a forward benchmark against
PyTorch eager bf16, on one GPU (run by scripts/gpu-check.sh on the lent GPU machine; needs torch
with CUDA and transformers, no network).

    python3 scripts/gpu_parity.py --tests PATH/TO/tests --work /tmp/eva-gpu [--quick]

1. Models: the fixtures in tests/reference (llama, mistral, qwen2, bert, roberta) and two random
   Llama checkpoints written here (no hub): SmolLM2-135M's shape (576 hidden, 30 blocks, 9/3 heads)
   and a ~1B Llama shape (2048 hidden, 16 blocks, 32/8 heads, 8192 intermediate), BF16 safetensors.
2. Parity: the eva test binary's `dump_layer_inputs_for_gpu_parity_py` writes eva's layer inputs
   (every block, every capture point, named by module) for fixed token ids; PyTorch runs the same
   ids (one sequence at a time, no padding, eager attention, TF32 off) with forward pre-hooks on
   those modules. Error per tensor = max |eva - torch| / max |torch|.
   --dtype f32: must be <= 1e-4 (fails the script otherwise).
   --dtype bf16: reported next to PyTorch's own bf16 error against its f32 (same metric), so the
   two bf16 paths are compared on the same footing; fails only above 5e-2.
   (The whole adapter against the CPU's is the ignored test `whole_adapter_matches_the_cpu` of
   tests/suite/gpu.rs, which scripts/gpu-check.sh runs before this script.)
3. Benchmark: forward tokens/s of eva (`bench_forward_tokens_per_second`, bf16) and of PyTorch
   eager bf16 (the base model, default attention = SDPA, no torch.compile) on the same random ids,
   8 sequences x 512 tokens, synchronized timings, medians of 10 passes after 2 warm-ups.

Prints one JSON line per result and a final summary table; exit status 1 if a parity bound fails.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_TOL = 1e-4
BF16_FAIL = 5e-2
FIXTURES = ["llama", "mistral", "qwen2", "bert", "roberta"]


def log(**kv):
    print(json.dumps(kv), flush=True)


def random_llama(path, hidden, layers, heads, kv_heads, intermediate, vocab, tie):
    """A randomly initialized Llama checkpoint (BF16 safetensors) built on the GPU; no hub."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaModel(cfg)
    model = model.to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return path


def run_eva(tests, test_name, env):
    full = dict(os.environ, EVA_REPO_DIR=REPO, **env)
    cmd = [tests, "--ignored", "--exact", test_name, "--nocapture", "--test-threads=1"]
    p = subprocess.run(cmd, env=full, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise RuntimeError(f"{test_name} failed (exit {p.returncode})")
    return p.stdout + p.stderr


def torch_inputs(model_dir, names, ids, lengths, dtype):
    """PyTorch's inputs of the modules `names` (checkpoint paths) for each sequence, concatenated."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation="eager").cuda().eval()
    got = {n: [] for n in names}
    hooks = []
    for n in names:
        mod = None
        parts = n.split(".")
        for skip in range(0, 2):
            try:
                mod = model.get_submodule(".".join(parts[skip:]))
                break
            except AttributeError:
                continue
        if mod is None:
            raise KeyError(f"no module {n} in {type(model).__name__}")
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0][0].float().cpu())))
    start = 0
    with torch.no_grad():
        for n in lengths:
            seq = torch.tensor(ids[start:start + n], device="cuda")[None]
            kwargs = {}
            if cfg.model_type in ("bert", "roberta"):
                kwargs["token_type_ids"] = torch.zeros_like(seq)
            model(input_ids=seq, **kwargs)
            start += n
    for h in hooks:
        h.remove()
    del model
    torch.cuda.empty_cache()
    return {n: torch.cat(v) for n, v in got.items()}


def err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def parity(tests, name, model_dir, lengths, work, failures):
    out = {}
    for dtype in ["f32", "bf16"]:
        path = os.path.join(work, f"eva-{name}-{dtype}.safetensors")
        t = time.time()
        run_eva(tests, "suite::gpu::dump_layer_inputs_for_gpu_parity_py", {
            "EVA_PARITY_MODEL": model_dir, "EVA_PARITY_DTYPE": dtype,
            "EVA_PARITY_LENGTHS": ",".join(map(str, lengths)), "EVA_PARITY_OUT": path})
        out[dtype] = load_file(path)
        log(step="eva dump", model=name, dtype=dtype, seconds=round(time.time() - t, 2))
    ids = out["f32"]["input_ids"][0].tolist()
    names = [k for k in out["f32"] if k not in ("input_ids", "lengths")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref32 = torch_inputs(model_dir, names, ids, lengths, torch.float32)
    ref16 = torch_inputs(model_dir, names, ids, lengths, torch.bfloat16)
    worst = {"eva_f32": 0.0, "eva_bf16": 0.0, "torch_bf16": 0.0}
    for n in names:
        e32 = err(out["f32"][n], ref32[n])
        e16 = err(out["bf16"][n], ref32[n])
        t16 = err(ref16[n], ref32[n])
        worst = {"eva_f32": max(worst["eva_f32"], e32), "eva_bf16": max(worst["eva_bf16"], e16), "torch_bf16": max(worst["torch_bf16"], t16)}
        if e32 > F32_TOL or e16 > BF16_FAIL:
            failures.append(f"{name} {n}: eva f32 {e32:.2e} (<= {F32_TOL:.0e}), eva bf16 {e16:.2e} (<= {BF16_FAIL:.0e})")
    log(step="parity", model=name, tensors=len(names), tokens=len(ids), max_err_eva_f32_vs_torch_f32=worst["eva_f32"],
        max_err_eva_bf16_vs_torch_f32=worst["eva_bf16"], max_err_torch_bf16_vs_torch_f32=worst["torch_bf16"])
    return worst


def bench_torch(model_dir, seqs, length, passes=10):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(13)
    ids = torch.randint(4, vocab, (seqs, length), generator=g).cuda()
    times = []
    with torch.no_grad():
        for i in range(passes + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=ids)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    del model
    torch.cuda.empty_cache()
    times.sort()
    return seqs * length / times[len(times) // 2]


def bench(tests, name, model_dir, seqs, length):
    text = run_eva(tests, "suite::gpu::bench_forward_tokens_per_second", {
        "EVA_BENCH_MODEL": model_dir, "EVA_BENCH_DTYPE": "bf16", "EVA_BENCH_SEQS": str(seqs), "EVA_BENCH_LEN": str(length)})
    line = next(l for l in text.splitlines() if l.startswith("EVA_BENCH "))
    eva = float(line.split("tokens_per_s=")[1].split()[0])
    pt = bench_torch(model_dir, seqs, length)
    log(step="bench", model=name, tokens_per_pass=seqs * length, eva_bf16_tokens_per_s=eva, torch_eager_bf16_tokens_per_s=pt,
        torch_over_eva=pt / eva)
    return eva, pt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", required=True, help="eva's integration-test binary built with --features cuda")
    ap.add_argument("--work", default="/tmp/eva-gpu")
    ap.add_argument("--quick", action="store_true", help="skip the ~1B model")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    log(step="device", name=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    failures = []
    for f in FIXTURES:
        d = os.path.join(REPO, "tests", "reference", f)
        with open(os.path.join(d, "config.json")) as fh:
            maxpos = json.load(fh).get("max_position_embeddings", 4096)
        lengths = [300, 13, 5, 1] if f in ("llama", "mistral", "qwen2") else [min(20, maxpos - 4), 7, 1]
        parity(a.tests, f, d, lengths, a.work, failures)
    smol = random_llama(os.path.join(a.work, "random-smollm2-135m"), 576, 30, 9, 3, 1536, 49152, True)
    parity(a.tests, "random-smollm2-135m", smol, [512, 200, 33], a.work, failures)
    results = [("random-smollm2-135m", *bench(a.tests, "random-smollm2-135m", smol, 8, 512))]
    if not a.quick:
        big = random_llama(os.path.join(a.work, "random-llama-1b"), 2048, 16, 32, 8, 8192, 32000, False)
        results.append(("random-llama-1b", *bench(a.tests, "random-llama-1b", big, 8, 512)))
    print("\n| model | eva bf16 tokens/s | PyTorch eager bf16 tokens/s | PyTorch / eva |\n|---|---|---|---|")
    for name, eva, pt in results:
        print(f"| {name} | {eva:,.0f} | {pt:,.0f} | {pt / eva:.2f} |")
    if failures:
        print("\nPARITY FAILURES:\n" + "\n".join(failures))
        sys.exit(1)
    print("\nparity: every tensor within bounds")


if __name__ == "__main__":
    main()
