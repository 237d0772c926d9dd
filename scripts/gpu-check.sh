#!/usr/bin/env bash
# One short visit to a GPU machine verifies eva's CUDA path (docs/gpu.md, "Verifying on a GPU").
#
#   scripts/gpu-check.sh build   # here: a machine with Rust (no GPU, no CUDA needed)
#   scripts/gpu-check.sh run     # there: the GPU machine (CUDA 13 driver, PyTorch, no Rust, no network)
#
# `build` compiles the CUDA 13 flavour (cudarc loads libcublas.so.13 & co.: CUDARC_CUDA_VERSION=13000)
# of eva's test binaries in release mode into target/cuda13, strips them, and packs them with the
# OpenBLAS they link (the GPU machine may not have it) into dist/gpu-check.tar.gz (< 64 MiB: the
# device `run` tool carries the working tree plus ignored paths named in `carry`, 64 MiB in all).
# The fixtures in tests/reference are tracked, so they travel with the tree.
#
# `run`, on the GPU machine, in the copied tree, in under 8 minutes:
#   1. nvidia-smi, and the CUDA libraries found in PyTorch's site-packages put on LD_LIBRARY_PATH;
#   2. the CUDA backend's unit tests (kernel compile with that machine's NVRTC for sm_80/sm_90,
#      launch shapes, flush schedule) and every ignored GPU test (tests/suite/gpu.rs: forward
#      parity with the CPU backend on llama, mistral, qwen2, bert, roberta in f32 and bf16; device
#      Gram and sketch against f64; the engine's device statistics (packed shared parts, G·Q,
#      copies) against the host's; the whole adapter of `eva init --device cuda` against the CPU's);
#   3. scripts/gpu_parity.py: eva's layer inputs against PyTorch's own (f32 and bf16), and the
#      forward benchmark against PyTorch eager bf16 (random SmolLM2-135M-shaped and ~1B Llama).
# It prints everything and exits non-zero if any step failed.
#
# With the device tool (one call; nothing else is needed there):
#   run(command="bash scripts/gpu-check.sh run", carry=["dist/gpu-check.tar.gz"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

build() {
  set -e
  export CUDARC_CUDA_VERSION=13000
  local target=target/cuda13 out=dist/gpu-check
  rm -rf "$out" dist/gpu-check.tar.gz
  # $target.json is written before cargo creates target/ (a fresh checkout has none).
  mkdir -p "$out" "$target"
  # The integration tests (tests/suite/gpu.rs) and the library's unit tests (src/device/cuda/*, src/stats/device.rs).
  cargo test --release --features cuda --no-run --target-dir "$target" --message-format=json-render-diagnostics >"$target.json"
  cargo build --release --features cuda --target-dir "$target" --bin eva
  cp "$target/release/eva" "$out/eva"
  python3 - "$target.json" "$out" <<'PY'
import json, shutil, sys
msgs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
exes = {}
for m in msgs:
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        kind = m["target"]["kind"][0]
        name = {"test": "tests", "lib": "unit"}.get(kind)
        if name and (kind != "test" or m["target"]["name"] == "tests"):
            exes[name] = m["executable"]
assert set(exes) == {"tests", "unit"}, exes
for name, path in exes.items():
    shutil.copy(path, f"{sys.argv[2]}/{name}")
PY
  strip "$out/tests" "$out/unit" "$out/eva"
  # The OpenBLAS the binaries link (build.rs: -lopenblas) and what it needs.
  for lib in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    cp -L "$(ldconfig -p | awk -v l="$lib" '$1 == l { print $NF; exit }')" "$out/$lib"
  done
  tar czf dist/gpu-check.tar.gz -C dist gpu-check
  ls -l "$out" dist/gpu-check.tar.gz
  local size
  size=$(stat -c %s dist/gpu-check.tar.gz)
  if [ "$size" -gt $((60 << 20)) ]; then
    echo "dist/gpu-check.tar.gz is $size bytes: over the 64 MiB a device call carries (with the tree)" >&2
    exit 1
  fi
  echo "ready: run(command=\"bash scripts/gpu-check.sh run\", carry=[\"dist/gpu-check.tar.gz\"], timeout_s=540)"
}

run() {
  local start=$SECONDS failed=0 work=/tmp/eva-gpu
  step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }
  mkdir -p "$work"
  tar xzf dist/gpu-check.tar.gz -C "$work"
  local bin="$work/gpu-check"
  step "device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || failed=1
  # CUDA 13 libraries from PyTorch's pip wheels (nvidia/cu13/lib, or one lib dir per package);
  # cudarc tries libX.so first, then libX.so.13 (this build), then libX.so.1 (the driver).
  local libs
  libs=$(python3 - <<'PY'
import glob, os
import nvidia
roots = list(nvidia.__path__)
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
PY
)
  export LD_LIBRARY_PATH="$bin:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export EVA_REPO_DIR="$PWD" EVA_BIN="$bin/eva" EVA_REQUIRE_NVRTC=1 RUST_BACKTRACE=1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

  step "unit tests of the CUDA backend (NVRTC compile for sm_80 and sm_90 with this machine's NVRTC)"
  timeout 60 "$bin/unit" device::cuda stats::device --test-threads=1 --nocapture || failed=1

  step "ignored GPU tests (tests/suite/gpu.rs)"
  timeout 240 "$bin/tests" --ignored suite::gpu:: --skip dump_layer_inputs --skip bench_forward --test-threads=1 --nocapture || failed=1

  step "parity against PyTorch's layer inputs and the forward benchmark (scripts/gpu_parity.py)"
  local quick=""
  if [ $((SECONDS - start)) -gt 200 ]; then quick="--quick"; fi
  timeout $((450 - (SECONDS - start))) python3 scripts/gpu_parity.py --tests "$bin/tests" --work "$work" $quick || failed=1

  step "done: $([ $failed = 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED') in $((SECONDS - start)) s"
  return $failed
}

case "$mode" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run   (see the comment at the top)" >&2; exit 2 ;;
esac
