#!/usr/bin/env bash
# The GPU session's one prepared run: bench/gpu.py rows, then the Ray rows, partial results kept in $OUT.
set -u
source .gpu-bundle/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, shutil; print(torch.__version__, torch.cuda.is_available(), shutil.which('gcc'))" | tee -a "$OUT/device.txt"
timeout 330 python3 bench/gpu.py --pairs digits cifar --steps 30 --warmup 5 \
  --settings fp32+off tf32+off bf16+off tf32+cudagraphs bf16+cudagraphs \
  --out "$OUT/gpu.json" > "$OUT/gpu.log" 2> "$OUT/gpu.err"
echo "local rows rc=$?"
tail -5 "$OUT/gpu.err"
timeout 150 python3 bench/gpu.py --pairs digits --settings fp32+off --steps 30 --warmup 5 --ray --ray-steps 200 \
  --out "$OUT/gpu_ray.json" > "$OUT/gpu_ray.log" 2> "$OUT/gpu_ray.err"
echo "ray rows rc=$?"
tail -5 "$OUT/gpu_ray.err"
grep -h '^{"pair' "$OUT/gpu.log" "$OUT/gpu_ray.log" | cut -c1-400
