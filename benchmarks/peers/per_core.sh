#!/bin/bash
# The peers benchmark on a many-core machine: one process per model (and batch list), each pinned with taskset to a
# core of its own at 1 thread, all at once; then their rows merged into one results file. Used for the Intel Xeon
# tables (issue 20), where a lent machine gives one call of a few minutes. Routes stay interleaved inside each
# process, so the neighbours' load (shared L3, memory) falls on every route of a round alike.
#
#   OUT=/tmp/peers LIMIT=465 bash benchmarks/peers/per_core.sh "halonet_h1 1" "mobilevit_xs 1 8" ...
#   python3 benchmarks/peers/run.py --merge /tmp/peers/peers_*.json --out benchmarks/peers/results_frozen.json
#
# Each argument is "model batch [batch ...]"; ROUNDS (5) and LIMIT (seconds per process, 465) from the environment.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/peers}; LIMIT=${LIMIT:-465}; ROUNDS=${ROUNDS:-5}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "per_core.sh: $OUT is not empty (its results would be merged with this run's)" >&2; exit 2
fi
mkdir -p "$OUT"
{ date -u; lscpu; python3 -c "import torch, timm, onnxruntime; print(torch.__version__, timm.__version__, onnxruntime.__version__)"; } > "$OUT/machine.txt" 2>&1
# one CPU per physical core, among the CPUs this process may run on (a container may allow fewer than lscpu lists)
ALLOWED=$(python3 -c "import os; print(' '.join(map(str, sorted(os.sched_getaffinity(0)))))")
mapfile -t CPUS < <(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -k1,1n \
  | awk -F, -v allowed=" $ALLOWED " 'index(allowed, " " $1 " ") && !seen[$2]++ {print $1}')
if [ "$#" -gt "${#CPUS[@]}" ]; then
  echo "per_core.sh: $# jobs but ${#CPUS[@]} cores to pin them to (two on one core would spoil both)" >&2; exit 2
fi
export PYTHONPATH=src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
i=0
for job in "$@"; do
  read -r model batches <<< "$job"
  cpu=${CPUS[$i]}
  tag="${model}_b${batches// /_}"  # file names without spaces or commas (the device tool drops those)
  ( taskset -c "$cpu" timeout "$LIMIT" python3 benchmarks/peers/run.py --models "$model" --batches $batches \
      --rounds "$ROUNDS" --threads 1 --out "$OUT/peers_$tag.json" > "$OUT/log_$tag.txt" 2>&1
    echo "rc=$? cpu=$cpu" >> "$OUT/log_$tag.txt" ) &
  i=$((i + 1))
done
wait
grep -h "rc=" "$OUT"/log_*.txt
