#!/usr/bin/env bash
# Layer slices on one box: peak RSS per rank for --pp 1, 2, 3, and the pipeline against data
# parallelism on the same ranks (docs/benchmarks.md, "Layer slices"). Needs a release build with
# `--features mpi` and the llama-100m bench model (`cargo bench --bench forward -- llama-100m
# examples=16 reps=1 forward-only` writes it under target/bench-models/).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
EVA=${EVA:-./target/release/eva}
MODEL=${MODEL:-target/bench-models/llama-100m}
DATA=${DATA:-examples/data/train.txt}
STEPS=${STEPS:-4}
common=(init --model "$MODEL" --data "$DATA" -q --force --threads 1 --estimator exact --max-steps "$STEPS")
report() { python3 -c "import json,sys; r=json.load(open(sys.argv[1]+'/eva_report.json')); b=r['bytes']; print(f\"total {r['time_s']['total']:.2f} s, forward {r['time_s']['forward']:.2f} s, statistics {r['time_s']['statistics']:.2f} s, communication {r['time_s']['communication']:.2f} s, steps {r['steps']}, collective bytes/step {b['per_rank_mean_step']:.0f}, hidden bytes/step {sum(b.get('hidden_per_step',[0]))/max(1,len(b.get('hidden_per_step',[1]))):.0f}\")" "$1"; }

echo "== peak RSS per rank (batch 16, $STEPS steps)"
for S in 1 2 3; do
  mpirun -np "$S" bash -c '/usr/bin/time -f "pp '"$S"' rank $OMPI_COMM_WORLD_RANK: peak RSS %M kB" '"$EVA"' "$@" 2>&1 | grep "peak RSS"' _ "${common[@]}" --out "/tmp/eva-rss-$S" --batch-size 16 --pp "$S"
done

for B in 16 32; do
  echo "== batch $B: one rank, dp = 2, pp = 2 (one thread per rank)"
  mpirun -np 1 "$EVA" "${common[@]}" --out /tmp/eva-p1 --batch-size "$B"; echo -n "1 rank:      "; report /tmp/eva-p1
  mpirun -np 2 "$EVA" "${common[@]}" --out /tmp/eva-dp2 --batch-size "$B"; echo -n "dp 2:        "; report /tmp/eva-dp2
  mpirun -np 2 "$EVA" "${common[@]}" --out /tmp/eva-pp2 --batch-size "$B" --pp 2; echo -n "pp 2:        "; report /tmp/eva-pp2
  cmp /tmp/eva-p1/adapter_model.safetensors /tmp/eva-pp2/adapter_model.safetensors && echo "pp 2 adapter bitwise equal to one rank's"
done
