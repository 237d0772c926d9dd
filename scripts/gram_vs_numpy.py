#!/usr/bin/env python3
"""Helper of scripts/gram_vs_numpy.sh (needs numpy and safetensors; the shell script makes a
scratch venv for them, never CI).

  write DIR --layers L --dim D --units U --tokens N   activation shards in the format of
                                                      docs/formats.md (one *.safetensors file per
                                                      unit, F32 [tokens, in_features] per layer,
                                                      metadata out_features)
  gram DIR [--reps R]                                 load every shard, then time X.T @ X (float32)
                                                      per layer; prints one JSON line
  report OUT                                          eva's time split from OUT/eva_report.json
"""

import argparse
import json
import os
import statistics
import sys
import time


def layer_names(layers):
    return [f"model.layers.{l}.self_attn.q_proj" for l in range(layers)]


def write(args):
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(args.dir, exist_ok=True)
    names = layer_names(args.layers)
    d, n = args.dim, args.tokens
    # Per layer: eigenvalues 1/i (a power law, like real activations), a mean, and two Householder
    # reflections so that the eigenvectors are dense. Each layer has its own data (distinct inputs).
    bases = []
    for l in range(args.layers):
        rng = np.random.default_rng([args.seed, l])
        scale = (np.arange(1, d + 1, dtype=np.float32) ** -0.5).astype(np.float32)
        mean = (0.5 * rng.standard_normal(d)).astype(np.float32)
        hs = [rng.standard_normal(d).astype(np.float32) for _ in range(2)]
        hs = [h / np.linalg.norm(h) for h in hs]
        bases.append((scale, mean, hs))
    meta = {"out_features": json.dumps({name: d for name in names})}
    for u in range(args.units):
        tensors = {}
        for l, name in enumerate(names):
            scale, mean, hs = bases[l]
            rng = np.random.default_rng([args.seed, l, u + 1])
            x = rng.standard_normal((n, d), dtype=np.float32)
            x *= scale
            for h in hs:
                x -= 2.0 * np.outer(x @ h, h)
            x += mean
            tensors[name] = np.ascontiguousarray(x, dtype=np.float32)
        save_file(tensors, os.path.join(args.dir, f"unit_{u:05d}.safetensors"), metadata=meta)
    print(f"wrote {args.units} shards of {args.layers} layers x [{n}, {d}] F32 to {args.dir}", file=sys.stderr)


def blas_info():
    """Which BLAS this numpy calls, from threadpoolctl (falls back to numpy's build config)."""
    import numpy as np

    info = {"numpy": np.__version__}
    try:
        from threadpoolctl import threadpool_info

        libs = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        info["blas"] = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "threading_layer", "filepath")}
            for p in libs
        ]
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        info["build_blas"] = cfg.get("Build Dependencies", {}).get("blas", {})
    except TypeError:  # numpy < 1.26 has no mode=
        pass
    return info


def gram(args):
    import numpy as np
    from safetensors.numpy import load_file

    files = sorted(f for f in os.listdir(args.dir) if f.endswith(".safetensors"))
    # Load everything first; only the products are timed.
    per_layer = {}
    for f in files:
        for name, x in load_file(os.path.join(args.dir, f)).items():
            per_layer.setdefault(name, []).append(x)
    names = sorted(per_layer)
    units = {name: len(per_layer[name]) for name in names}
    xs = {name: np.ascontiguousarray(np.concatenate(per_layer.pop(name)), dtype=np.float32) for name in names}
    tokens = {name: xs[name].shape[0] for name in names}
    rows = {name: tokens[name] // units[name] for name in names}

    def concatenated():
        for name in names:
            x = xs[name]
            g = x.T @ x  # numpy's matmul calls ssyrk for a matrix times its own transpose
            del g

    def per_unit():
        for name in names:
            x = xs[name]
            r = rows[name]
            g = np.zeros((x.shape[1], x.shape[1]), dtype=np.float32)
            for u in range(units[name]):
                xu = x[u * r:(u + 1) * r]
                g += xu.T @ xu

    def busy_s():
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / 100.0  # all but idle and iowait

    out = {"files": len(files), "layers": len(names), "dim": int(xs[names[0]].shape[1]), "tokens_per_layer": tokens[names[0]]}
    for label, fn in (("concatenated", concatenated), ("per_unit", per_unit)):
        fn()  # warm-up
        times, others = [], []
        for _ in range(args.reps):
            b0, c0 = busy_s(), sum(os.times()[:2])
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            own = sum(os.times()[:2]) - c0
            times.append(dt)
            others.append(round(max(busy_s() - b0 - own, 0.0) / dt, 2))
        out[label] = {"median_s": statistics.median(times), "times_s": times, "others": others}
    d = out["dim"]
    n_total = sum(tokens.values())
    out["gflop_conventional"] = 2.0 * n_total * d * d / 1e9
    out["blas_info"] = blas_info()
    out["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    print(json.dumps(out))


def report(args):
    with open(os.path.join(args.out, "eva_report.json")) as f:
        r = json.load(f)
    t = r["time_s"]
    print(json.dumps({k: t.get(k) for k in ("total", "forward", "statistics", "communication", "leader", "writing")} | {"steps": r.get("steps")}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir")
    w.add_argument("--layers", type=int, default=4)
    w.add_argument("--dim", type=int, default=1024)
    w.add_argument("--units", type=int, default=16)
    w.add_argument("--tokens", type=int, default=4096)
    w.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("gram")
    g.add_argument("dir")
    g.add_argument("--reps", type=int, default=3)
    r = sub.add_parser("report")
    r.add_argument("out")
    args = p.parse_args()
    {"write": write, "gram": gram, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
