#!/usr/bin/env bash
# Runs two eva binaries on the same inputs and checks that they write the same adapters, byte for
# byte: adapter_model.safetensors and adapter_config.json, and eva_report.json without its
# timings (fields a newer build adds to the report are listed, not failed). For refactors that must not change a number (docs/architecture.md):
#
#   git worktree add /tmp/eva-before <commit> && (cd /tmp/eva-before && cargo build --features mpi)
#   cargo build --features mpi
#   scripts/same-adapters.sh /tmp/eva-before/target/debug/eva target/debug/eva
#
# Inputs: the shipped tiny Llama on examples/data/train.txt (exact, auto, sketch, --pp 2 over two
# thread ranks), the BERT and sharded Llama fixtures of tests/reference on their data, synthetic
# spectra (exact and sketch) and activation shards this script writes (pure Python, seeded).
set -euo pipefail
old=${1:?usage: same-adapters.sh OLD_EVA NEW_EVA}
new=${2:?usage: same-adapters.sh OLD_EVA NEW_EVA}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Activation shards: 3 units of 2 layers (one equal-input pair) of seeded normal rows, F32.
python3 - "$work/shards" <<'PY'
import json, os, random, struct, sys
out = sys.argv[1]
os.makedirs(out)
rng = random.Random(7)
for u in range(3):
    tokens, d = 40 + 5 * u, 24
    a = [rng.gauss(0, 1) * (1 + j % 5) for _ in range(tokens) for j in range(d)]
    b = [rng.gauss(0, 1) for _ in range(tokens * 16)]
    tensors = {"model.layers.0.mlp.up_proj": (a, [tokens, d]), "model.layers.0.mlp.gate_proj": (a, [tokens, d]),
               "model.layers.0.mlp.down_proj": (b, [tokens, 16])}
    header, data = {"__metadata__": {"out_features": json.dumps({"model.layers.0.mlp.up_proj": 16,
                    "model.layers.0.mlp.gate_proj": 16, "model.layers.0.mlp.down_proj": 24})}}, b""
    for name, (v, shape) in tensors.items():
        raw = struct.pack(f"<{len(v)}f", *v)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, f"unit-{u:05}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
PY

runs=(
  "llama-exact|--model examples/tiny-llama --data examples/data/train.txt --estimator exact"
  "llama-auto|--model examples/tiny-llama --data examples/data/train.txt"
  "llama-sketch|--model examples/tiny-llama --data examples/data/train.txt --estimator sketch --max-steps 6"
  "llama-pp2|--model examples/tiny-llama --data examples/data/train.txt --pp 2 --local-ranks 2"
  "llama-shards|--model tests/reference/llama --data tests/reference/data.jsonl --rank 4"
  "bert|--model tests/reference/bert --data tests/reference/data.jsonl --rank 4"
  "synthetic-exact|--synthetic layers=8,group=3,dim=96,tokens=256,units=24,mean=2 --estimator exact"
  "synthetic-sketch|--synthetic layers=6,group=2,dim=128,tokens=256,units=24 --estimator sketch --rank 4"
  "activations|--activations $work/shards --rank 4"
)

# The old report's values, without what depends on the clock, must be in the new one unchanged;
# fields the new build adds (a newer report schema) are listed, not failed.
same_report() {
  python3 - "$1" "$2" <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:3])
clock = lambda k: k.startswith("time") or k.endswith("_s") or k in ("bytes", "tokens_per_s")
diffs, added = [], set()
def walk(a, b, path):
    if isinstance(a, dict) and isinstance(b, dict):
        added.update(f"{path}/{k}" for k in b if k not in a)
        for k in a:
            if clock(k):
                continue
            if k not in b:
                diffs.append(f"{path}/{k} removed")
            else:
                walk(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[]")
    elif a != b:
        diffs.append(f"{path}: {a!r} -> {b!r}")
walk(old, new, "")
if added:
    print("  (the new report adds " + ", ".join(sorted(added)) + ")")
for d in diffs[:5]:
    print("  " + d)
sys.exit(1 if diffs else 0)
PY
}

failed=0
for run in "${runs[@]}"; do
  name=${run%%|*}
  args=${run#*|}
  for side in old new; do
    bin=$old
    [ "$side" = new ] && bin=$new
    # shellcheck disable=SC2086
    "$bin" init $args --out "$work/$name-$side" --force --quiet --threads 2 2>"$work/$name-$side.err" ||
      { echo "$name: $side failed: $(tail -n 3 "$work/$name-$side.err")"; failed=1; continue 2; }
  done
  same=1
  for f in adapter_model.safetensors adapter_config.json; do
    cmp -s "$work/$name-old/$f" "$work/$name-new/$f" || { echo "$name: $f differs"; same=0; }
  done
  same_report "$work/$name-old/eva_report.json" "$work/$name-new/eva_report.json" ||
    { echo "$name: eva_report.json differs (beyond timings)"; same=0; }
  [ $same = 1 ] && echo "$name: identical" || failed=1
done
exit $failed
