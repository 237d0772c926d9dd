#!/usr/bin/env bash
# End-to-end speed check: the whole `eva init --activations DIR` run over large shards against the
# time numpy/OpenBLAS needs just to compute the same Grams (X.T @ X, float32) with every array
# already in memory. The bar: eva takes at most 2x the numpy time.
#
# Usage: bash scripts/gram_vs_numpy.sh [DIM:LAYERS:UNITS ...]     (default: 1024:4:16 4096:2:8)
#   Each variant writes UNITS shards of LAYERS distinct layer inputs of [TOKENS, DIM] F32.
# Environment:
#   EVA_BENCH_VENV   scratch venv with numpy, safetensors, threadpoolctl   (/tmp/eva-bench-venv)
#   EVA_BENCH_DIR    where the shards and outputs go                       (/tmp/eva-bench)
#   EVA_BENCH_REPS   timed runs of each side, median reported              (3)
#   EVA_BENCH_TOKENS rows per shard and layer                              (4096)
#   EVA_BENCH_KEEP   1 = keep the shards afterwards                        (0)
#   EVA_BIN          eva binary to time      (default: cargo build --release, target/release/eva)
# Needs python3 with venv and pip access (PyPI). Never part of CI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER="$ROOT/scripts/gram_vs_numpy.py"
VENV=${EVA_BENCH_VENV:-/tmp/eva-bench-venv}
WORK=${EVA_BENCH_DIR:-/tmp/eva-bench}
REPS=${EVA_BENCH_REPS:-3}
TOKENS=${EVA_BENCH_TOKENS:-4096}
KEEP=${EVA_BENCH_KEEP:-0}
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(1024:4:16 4096:2:8)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bench] creating venv $VENV" >&2
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import numpy, safetensors, threadpoolctl' 2>/dev/null ||
    "$VENV/bin/pip" install -q numpy safetensors threadpoolctl >&2
PY="$VENV/bin/python"

if [ -z "${EVA_BIN:-}" ]; then
    echo "[bench] cargo build --release --bin eva" >&2
    (cd "$ROOT" && cargo build --release --bin eva -q)
    EVA_BIN="$ROOT/target/release/eva"
fi

# Busy CPU seconds of the whole machine so far (/proc/stat, all but idle and iowait).
busy_s() { awk '/^cpu /{printf "%.2f\n", ($2+$3+$4+$7+$8+$9)/100}' /proc/stat; }

# One `eva init` run: wall seconds, peak RSS in KiB, and the cores other processes used meanwhile
# (machine busy time minus eva's own CPU time, over the wall time). eva's warnings are shown when
# $3 is "show", else dropped.
time_eva() {
    local dir=$1 out=$2 tf b0 b1
    local cmd=("$EVA_BIN" init --activations "$dir" --out "$out" --force --no-early-stop --estimator exact -q)
    tf=$(mktemp)
    b0=$(busy_s)
    if [ "${3:-}" = show ]; then
        /usr/bin/time -f '%e %M %U %S' -o "$tf" "${cmd[@]}"
    else
        /usr/bin/time -f '%e %M %U %S' -o "$tf" "${cmd[@]}" 2>/dev/null
    fi
    b1=$(busy_s)
    read -r e m u s <"$tf"
    rm -f "$tf"
    echo "$e $m $(awk -v e="$e" -v u="$u" -v s="$s" -v b0="$b0" -v b1="$b1" 'BEGIN{o=(b1-b0-u-s)/e; if(o<0)o=0; printf "%.2f", o}')"
}

median() { "$PY" -c 'import sys, statistics; print(statistics.median(float(v) for v in sys.argv[1:]))' "$@"; }

echo "[bench] $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "[bench] eva: $EVA_BIN; OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE-<unset>} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE-<unset>} (left as is for eva, unset for numpy)" >&2
mkdir -p "$WORK"
ROWS=()
for v in "${VARIANTS[@]}"; do
    IFS=: read -r DIM LAYERS UNITS <<<"$v"
    DIR="$WORK/shards-d$DIM-l$LAYERS-u$UNITS-n$TOKENS"
    OUT="$WORK/out-d$DIM"
    if [ ! -f "$DIR/.complete" ]; then
        rm -rf "$DIR"
        echo "[bench] writing $UNITS shards of $LAYERS x [$TOKENS, $DIM] to $DIR" >&2
        "$PY" "$HELPER" write "$DIR" --layers "$LAYERS" --dim "$DIM" --units "$UNITS" --tokens "$TOKENS"
        touch "$DIR/.complete"
    fi
    GIB=$("$PY" -c "print(f'{$LAYERS*$UNITS*$TOKENS*$DIM*4/2**30:.2f}')")

    echo "[bench] d=$DIM: eva init, 1 untimed + $REPS timed runs" >&2
    time_eva "$DIR" "$OUT" show >/dev/null
    EVA_T=()
    EVA_OTHERS=()
    RSS=0
    for _ in $(seq "$REPS"); do
        read -r t rss others < <(time_eva "$DIR" "$OUT")
        EVA_T+=("$t")
        EVA_OTHERS+=("$others")
        RSS=$rss
        echo "[bench]   eva init: $t s (peak RSS $((rss / 1024)) MiB, other processes $others cores)" >&2
    done
    EVA_MED=$(median "${EVA_T[@]}")
    SPLIT=$("$PY" "$HELPER" report "$OUT")

    echo "[bench] d=$DIM: numpy X.T @ X, 1 untimed + $REPS timed rounds (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE unset)" >&2
    NP=$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" "$HELPER" gram "$DIR" --reps "$REPS")
    ROWS+=("$("$PY" - "$DIM" "$LAYERS" "$UNITS" "$TOKENS" "$GIB" "$EVA_MED" "$RSS" "${EVA_T[*]}" "$SPLIT" "$NP" "${EVA_OTHERS[*]}" <<'EOF'
import json, sys
dim, layers, units, tokens, gib, eva, rss, eva_all, split, np_, others = sys.argv[1:]
split, np_ = json.loads(split), json.loads(np_)
# Worst load from other processes during any timed run (cores): above ~0.1 the times are disturbed.
others = max([float(v) for v in others.split()] + np_["concatenated"]["others"] + np_["per_unit"]["others"])
eva = float(eva)
cat, per = np_["concatenated"]["median_s"], np_["per_unit"]["median_s"]
blas = np_["blas_info"].get("blas") or [{}]
b = blas[0]
blas_s = f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, {b.get('num_threads')} threads)"
print("|".join([
    "", f" {dim} ", f" {layers} x {units} x {tokens} ({gib} GiB) ",
    f" {eva:.2f} ({', '.join(eva_all.split())}) ",
    f" {split['forward']:.2f} / {split['statistics']:.2f} / {split['leader']:.2f} ",
    f" {cat:.2f} / {per:.2f} ",
    f" **{eva / cat:.2f}** / {eva / per:.2f} ",
    " yes " if eva <= 2 * cat else " **no** ",
    f" {int(rss) // 1024} MiB ",
    f" {others:.2f} ",
    f" numpy {np_['blas_info']['numpy']}, {blas_s} ", ""]))
EOF
)")
    if [ "$KEEP" != 1 ]; then rm -rf "$DIR"; fi
done

echo
echo "eva init vs numpy Gram, $(date -u '+%Y-%m-%d'), median of $REPS runs each"
echo
echo "| d | layers x shards x tokens | eva init, s (runs) | eva: read / statistics / leader, s | numpy X.T@X, s: concatenated / per shard | ratio eva / numpy | ≤ 2× | eva peak RSS | other load, cores | numpy BLAS |"
echo "|---:|---|---:|---|---|---|---|---:|---:|---|"
printf '%s\n' "${ROWS[@]}"
