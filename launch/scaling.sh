#!/usr/bin/env bash
# Strong scaling of `eva init` on synthetic data: the same global work on P = 1, 2, 4, ... ranks.
# Prints per-step time split into compute (data + statistics) / communication / leader, bytes per
# step and efficiency T1 / (P · T_P) from each run's eva_report.json.
#
#   launch/scaling.sh                       # P = 1 2 4, default workload
#   PS="1 2 4 8 16" SPEC="layers=8,dim=4096,tokens=4096,units=256" launch/scaling.sh
#
# Needs: cargo build --release --features mpi; OpenMPI; python3 (to read the JSON reports).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
eva=${EVA:-$here/target/release/eva}
PS=${PS:-"1 2 4"}
SPEC=${SPEC:-"layers=4,dim=1024,tokens=2048,units=32,decay=1.0"}
EXTRA=${EXTRA:-"--no-early-stop --estimator exact --batch-size 8"}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none

for p in $PS; do
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    mpirun -np "$p" ${MPIRUN_ARGS:-} "$eva" init --synthetic "$SPEC" --out "$work/p$p" -q $EXTRA
    end=$(date +%s.%N)
    echo "$p $start $end" >> "$work/wall"
done

python3 - "$work" "$SPEC" <<'PY'
import json, sys
work, spec = sys.argv[1], sys.argv[2]
walls = {p: float(b) - float(a) for p, a, b in (line.split() for line in open(f"{work}/wall"))}
rows = []
for p, wall in walls.items():
    r = json.load(open(f"{work}/p{p}/eva_report.json"))
    t, steps = r["time_s"], max(r["steps"], 1)
    rows.append((int(p), float(wall), t["total"], steps, (t["forward"] + t["statistics"]) / steps,
                 t["communication"] / steps, t["leader"] / steps, r["bytes"]["per_rank_mean_step"]))
t1 = next(row[2] for row in rows if row[0] == 1) if any(row[0] == 1 for row in rows) else None
print(f"synthetic: {spec}")
print("| P | wall s | run s | steps | compute s/step | comm s/step | leader s/step | bytes/step/rank | efficiency |")
print("|---|---|---|---|---|---|---|---|---|")
for p, wall, total, steps, comp, comm, lead, b in sorted(rows):
    eff = f"{t1 / (p * total):.0%}" if t1 else "n/a"
    print(f"| {p} | {wall:.2f} | {total:.2f} | {steps} | {comp:.3f} | {comm:.3f} | {lead:.3f} | {b/1e6:.2f} MB | {eff} |")
PY
