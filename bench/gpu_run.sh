#!/usr/bin/env bash
# A prepared GPU session in phases (one `run` call each), every result in $OUT even when a phase runs
# out of time: `local` times the local engine's step (bench/gpu.py rows), `ray` adds the Ray rows.
#   bash bench/gpu_run.sh local|ray
set -u
source .gpu-bundle/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
phase=${1:-local}
bench() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/gpu.py "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2> "$OUT/$name.err"
  echo "$name rc=$?"
  grep -v Warning "$OUT/$name.err" | grep -E "Error|error:" | sort | uniq -c | head -5
  grep -h '^{"pair' "$OUT/$name.log" | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    keys = ("pair", "engine", "precision", "compile", "teacher_replicas", "ms_per_step", "teacher_ms", "student_ms",
            "first_step_s", "peak_memory_mb", "pipeline_efficiency", "student_idle_fraction", "error")
    print({k: (round(r[k], 2) if isinstance(r[k], float) else r[k]) for k in keys if k in r})'
}
if [ "$phase" = local ]; then
  bench digits 150 --pairs digits --steps 50 --warmup 5 --settings fp32+off tf32+step bf16+step tf32+cudagraphs
  bench cifar 170 --pairs cifar --steps 30 --warmup 5 --settings bf16+step bf16+cudagraphs
fi
if [ "$phase" = ray ]; then
  # Uncompiled rows only: compiling the networks in every replica and rank costs minutes per job.
  bench ray 330 --ray --local ray --steps 30 --warmup 5 --ray-steps 300 --ray-replicas 1 2 \
    --ray-settings digits:fp32+off cifar:tf32+off:bf16
fi
