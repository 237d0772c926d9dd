#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler; it needs no GPU and no driver) from PyPI's wheel into a
# cache and prints the directory holding `libnvrtc.so` (put it on LD_LIBRARY_PATH).
# The kernels include no CUDA header (bf16 is converted by hand in src/device/cuda/kernels.cu), so
# nvidia-cuda-runtime's include directory is not needed.
# Used by .ci/run, so that the kernel-compile test (src/device/cuda/kernels.rs) runs in CI.
# cudarc loads the unversioned `libnvrtc.so` first, so the symlink serves any cudarc CUDA version.
set -euo pipefail
NVRTC_VERSION=13.0.88
cache="${EVA_CACHE:-${HOME:-/root}/.cache/eva}/nvrtc-$NVRTC_VERSION"
if [ ! -e "$cache/lib/libnvrtc.so" ]; then
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$wheels" "nvidia-cuda-nvrtc==$NVRTC_VERSION" >&2
  mkdir -p "$cache/lib"
  python3 - "$wheels" "$cache" <<'PY'
import glob, os, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
for wheel in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            # nvidia/cu13/lib/libnvrtc.so.13 and libnvrtc-builtins.so.13.0 (not the .alt builds).
            if len(parts) == 4 and parts[2] == "lib" and parts[3].startswith("libnvrtc") and ".alt." not in parts[3]:
                dest = os.path.join(out, *parts[2:])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(name) as src, open(dest, "wb") as dst:
                    dst.write(src.read())
PY
  ln -sf libnvrtc.so.13 "$cache/lib/libnvrtc.so"
  rm -rf "$wheels"
fi
echo "$cache/lib"
