#!/usr/bin/env bash
# Resident memory of one `eva init` over its steps: samples VmRSS and VmHWM of the process from
# /proc every INTERVAL seconds (default 0.05), tags each sample with the last step the progress
# log reported, and prints RSS at the first sample at or after each step of STEPS (default
# "1 10 50 100 150 200 250 300"), plus the peak (VmHWM) over the whole run.
#
#   scripts/rss_over_steps.sh                     # the default run below, release binary
#   scripts/rss_over_steps.sh --model examples/tiny-llama --data big.txt --max-steps 300 ...
#
# Without arguments it runs 300 steps of synthetic data that never stop early:
#   --synthetic layers=8,group=3,dim=256,tokens=256,units=600 --batch-size 2 --max-steps 300 --no-early-stop
# The progress log is plain lines (stderr is not a terminal), at most one per second, so the
# run should last at least a few seconds per reported step range; the script adds nothing else.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
eva=${EVA:-$here/target/release/eva}
interval=${INTERVAL:-0.05}
steps=${STEPS:-"1 10 50 100 150 200 250 300"}
[ -x "$eva" ] || { echo "no eva binary at $eva; build it with: cargo build --release" >&2; exit 2; }
if [ $# -eq 0 ]; then
    set -- --synthetic "layers=8,group=3,dim=256,tokens=256,units=600" --batch-size 2 \
        --max-steps 300 --no-early-stop
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$eva" init "$@" --out "$work/adapter" 2>"$work/log" &
pid=$!
: >"$work/samples"
while kill -0 "$pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    step=$(grep -o 'step [0-9]*' "$work/log" 2>/dev/null | tail -n 1 | cut -d' ' -f2 || true)
    [ -n "$rss" ] && echo "${step:-0} $rss $hwm" >>"$work/samples"
    sleep "$interval"
done
wait "$pid" || { echo "eva failed:" >&2; cat "$work/log" >&2; exit 1; }
echo "eva init $*"
echo "samples: $(wc -l <"$work/samples") every ${interval} s"
printf '%8s %12s %12s\n' step "VmRSS MiB" "VmHWM MiB"
for s in $steps; do
    awk -v s="$s" '$1 >= s { printf "%8d %12.1f %12.1f\n", $1, $2 / 1024, $3 / 1024; exit }' "$work/samples"
done
awk '{ if ($3 > m) m = $3 } END { printf "peak VmHWM over the run: %.1f MiB\n", m / 1024 }' "$work/samples"
grep -o 'step [0-9]*/[0-9]*' "$work/log" | tail -n 1 | sed 's/^/last reported: /'
