#!/usr/bin/env bash
# One prepared GPU session: bench/gpu.py rows, then `dkdm distill` end to end with the GPU defaults.
# Partial results stay in $OUT when a step runs out of time.
set -u
source .gpu-bundle/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout 230 python3 bench/gpu.py --pairs digits cifar --steps 30 --warmup 5 \
  --settings fp32+off tf32+step bf16+step tf32+cudagraphs \
  --out "$OUT/gpu.json" > "$OUT/gpu.log" 2> "$OUT/gpu.err"
echo "bench rc=$?"; grep -v Warning "$OUT/gpu.err" | grep -i "error" | sort | uniq -c | head -5
timeout 110 python3 -m services.cli distill --config configs/digits-dkdm.yaml --steps 300 --out /tmp/gpu-demo \
  --quiet --set run.eval_samples=500 --set run.checkpoint_every=150 > "$OUT/distill.log" 2>&1
echo "distill rc=$?"; tail -4 "$OUT/distill.log"; cp /tmp/gpu-demo/metrics.json "$OUT/distill_metrics.json" 2>/dev/null
python3 -c "import json; [print(l['step'], round(l['loss'],4), round(l['elapsed_s'],1)) for l in map(json.loads, open('/tmp/gpu-demo/log.jsonl')) if 'loss' in l]" | tail -3
grep -h '^{"pair' "$OUT/gpu.log" | cut -c1-330
