#!/usr/bin/env bash
# A default `eva init` against the same run with `--threads 1` while BUSY other processes
# (default: one per core, `yes > /dev/null`) keep every core busy; prints wall time and the CPU
# time eva used (user + system: a thread that spins while it waits shows up there). Each run is
# repeated REPS times (default 2), alternating, so a load change hits both alike.
#
#   scripts/contention.sh --model target/bench-models/llama-100m --data examples/data/train.txt \
#       --batch-size 16 --max-steps 2
#   BUSY=0 scripts/contention.sh ...        # the same without the other processes
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
eva=${EVA:-$here/target/release/eva}
busy=${BUSY:-$(nproc)}
reps=${REPS:-2}
[ -x "$eva" ] || { echo "no eva binary at $eva; build it with: cargo build --release" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: scripts/contention.sh EVA-INIT-ARGS..." >&2; exit 2; }
work=$(mktemp -d)
hogs=()
cleanup() {
    for p in "${hogs[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 "$busy"); do
    yes >/dev/null &
    hogs+=($!)
done
echo "eva init $* | $busy busy processes | $(nproc) cores"
printf '%-12s %8s %8s %8s\n' run wall_s user_s sys_s
for r in $(seq 1 "$reps"); do
    for mode in default threads1; do
        extra=()
        [ "$mode" = threads1 ] && extra=(--threads 1)
        /usr/bin/time -f '%e %U %S' -o "$work/time" \
            "$eva" init "$@" "${extra[@]}" -q --force --out "$work/adapter-$mode" 2>"$work/log" \
            || { cat "$work/log" >&2; exit 1; }
        read -r wall user sys <"$work/time"
        printf '%-12s %8s %8s %8s\n' "$mode" "$wall" "$user" "$sys"
    done
done
cmp -s "$work/adapter-default/adapter_model.safetensors" "$work/adapter-threads1/adapter_model.safetensors" \
    && echo "adapters: byte-identical" || echo "adapters: DIFFER"
